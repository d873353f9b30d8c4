"""Packing pairs (`TrainConfig.pack_tokens`): padding share and step time on a run's own pairs (CPU, fp32).

    .venv/bin/python bench/packing_bench.py --root runs/demo/round-0 [--model DIR] [--batch-size 8]
        [--batches 4] [--steps 3] [--rounds 2] [--threads 0]

Reads the kept pairs of `<root>/pairs.parquet` and their stored frames through the trainer's own dataset
(`pairdata.PairsDataset`, the run's train config's `max_length` default) and forms micro-batches as the trainer does
(`LengthGroupedSampler`, --batch-size pairs, seed 0). Every micro-batch is collated with prefix sharing (one
`[prompt | chosen | rejected]` row per pair, right-padded to the longest) and then scored by `train.pair_logps`:

  rows       one joined row per pair (`pack_tokens: 0`, the default)
  pack_2x    pairs packed, in order, into rows of up to 2x the batch's longest joined row
  pack_all   the whole micro-batch in one row (no padding at all)

For each it reports the share of padding positions over all micro-batches (the positions the language model reads
that hold no token) and the median time of a forward + backward of the LeanPO objective (vision tower frozen and
cached, as in training), the settings run in rotating order over --rounds rounds so they meet the same load. All
three compute the same log-probs; the first batch's loss is printed for each (they agree to ~1e-5).
--model defaults to the newest `<root>/train/*/model` (any weights of the pairs' model family serve for timing).
Writes bench/results/packing.md and bench/results/packing.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SETTINGS = ("rows", "pack_2x", "pack_all")


def budget(setting: str, sizes: list[int]) -> int:
    """`pack_tokens` of a setting for a micro-batch whose joined rows have `sizes` tokens."""
    return {"rows": 0, "pack_2x": 2 * max(sizes), "pack_all": sum(sizes)}[setting]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.run_bench_arguments(parser, "a run's root (its pairs.parquet and frames/), e.g. a demo's round-0")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch (the demo's: 8)")
    parser.add_argument("--batches", type=int, default=4, help="micro-batches timed (padding counts all of them)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per batch, setting and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the settings, in rotating order")
    args = parser.parse_args(argv)

    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from leanpo_core import features, layout, models, pairdata, prefix, train
    from leanpo_core.config import TrainConfig

    root, model_dir = common.run_bench_setup(args)
    model, processor, adapter = models.load_model(model_dir, dtype=torch.float32, device="cpu")
    model.config.use_cache = False
    train._freeze_vision(model)
    model.train()
    config = TrainConfig(model=model_dir)
    run = layout.RunLayout(str(root))
    dataset = pairdata.PairsDataset(run.pairs, run.frames, processor, adapter, config.max_length)
    order = list(LengthGroupedSampler(args.batch_size, lengths=dataset.lengths,
                                      generator=torch.Generator().manual_seed(0)))
    collate = pairdata.PairCollator(processor.tokenizer.pad_token_id or 0, prefix_sharing=True)
    batches = [collate([dataset[i] for i in order[s:s + args.batch_size]])
               for s in range(0, len(order), args.batch_size)]
    positions = {s: 0 for s in SETTINGS}
    tokens = 0
    for batch in batches:
        lengths = batch[prefix.LENGTHS]
        sizes = lengths.sum(1).tolist()
        tokens += sum(sizes)
        positions["rows"] += len(sizes) * batch["input_ids"].shape[1]
        for setting in SETTINGS[1:]:
            packing = prefix.Packing.plan(sizes, budget(setting, sizes))
            positions[setting] += packing.num_rows * packing.length
    padding = {s: 1 - tokens / positions[s] for s in SETTINGS}

    cache = features.FeatureCache(2**30)
    timed = batches[:args.batches]
    times = {s: [] for s in SETTINGS}
    first_loss = {}

    def step(setting: str, batch: dict) -> float:
        inputs = {k: v for k, v in batch.items() if k not in pairdata.SIDE_INFO}
        pack = budget(setting, batch[prefix.LENGTHS].sum(1).tolist())
        sums, counts = train.pair_logps(model, adapter, inputs, config.logits_chunk_size, cache, pack)
        out = train.objective_loss(config, sums, counts, batch)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    for batch in timed:  # warm-up: fills the feature cache, as the first epoch does
        step("rows", batch)
    for r in range(args.rounds):
        for setting in SETTINGS[r % len(SETTINGS):] + SETTINGS[:r % len(SETTINGS)]:
            first_loss.setdefault(setting, step(setting, timed[0]))
            for batch in timed:
                wall, _ = common.time_steps(lambda: step(setting, batch), args.steps)
                times[setting].append(sum(wall) / len(wall))
    per_batch_ms = {s: 1000 * common.median(times[s]) for s in SETTINGS}

    rows = [[s, f"{100 * padding[s]:.1f}%", f"{positions[s]}", f"{per_batch_ms[s]:.0f}",
             f"{per_batch_ms['rows'] / per_batch_ms[s]:.2f}x", f"{first_loss[s]:.6f}"] for s in SETTINGS]
    body = [f"Pairs: {len(dataset)} kept pairs of `{common.run_relative(str(root), root)}` in {len(batches)} micro-batches "
            f"of {args.batch_size} (LengthGroupedSampler), {tokens} tokens in all; model "
            f"`{common.run_relative(model_dir, root)}` ({type(model).__name__}, {models.unwrap(model).config.model_type}); "
            f"{common.versions('torch', 'transformers')}; {torch.get_num_threads()} torch threads. Timing: the first "
            f"{len(timed)} micro-batches, forward + backward of the LeanPO objective, {args.steps} steps x "
            f"{args.rounds} rounds, median per batch.", "",
            *common.table(["setting", "padding share", "positions read", "ms per micro-batch", "speed vs rows",
                           "first-batch loss"], rows)]
    text = common.write_result("packing", "Packing pairs: padding share and step time", common.command_line(
        "packing_bench.py", argv), body)
    common.write_json("packing", {"pairs": len(dataset), "batch_size": args.batch_size, "tokens": tokens,
                                  "settings": {s: {"padding_share": padding[s], "positions": positions[s],
                                                   "ms_per_batch": per_batch_ms[s],
                                                   "speedup_over_rows": per_batch_ms["rows"] / per_batch_ms[s],
                                                   "first_loss": first_loss[s]} for s in SETTINGS}})
    print(text)
    return text


if __name__ == "__main__":
    main()
