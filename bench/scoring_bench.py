"""Likelihood scoring (the reflect stage's rbar pass): one row per response vs the feature cache vs shared prompts.

    .venv/bin/python bench/scoring_bench.py --root runs/demo/round-0 [--model DIR] [--shards 0] [--batch-size 16]
        [--rounds 3] [--threads 0]

Reads samples shards of a run (`<root>/samples`, the candidates the reflect stage scores), their videos and stored
frames, builds the reflect stage's own items (`reflect.prepare_shard`) and scores every candidate's rbar with
`reflect.sft_scores` three ways:

  separate       one row per response, the vision tower and the prompt once per response (before this week)
  cached         + the feature cache (`vision_feature_cache_mib`): the tower once per video
  shared         + prefix sharing (`ReflectConfig.prefix_sharing`, the default): a question's responses are one
                 row `[prompt | r1 | ... | rn]`, the prompt and its video tokens read once

A fresh cache for every timed pass (one shard's worth of reuse, as a run's first shard gets). The ways run in
rotating order over --rounds rounds; the time is the median. Reported: wall seconds, responses/s, speed-up over
separate, the language model's input positions (rows x padded length summed over batches), and the largest
|rbar difference| from separate (float summation order only). --model defaults to the newest
`<root>/train/*/model` (any weights of the run's model family serve for timing). Writes bench/results/scoring.md
and bench/results/scoring.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

WAYS = ("separate", "cached", "shared")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.run_bench_arguments(parser, "a run's root (samples/, frames/, videos.parquet), e.g. a demo's round-0")
    parser.add_argument("--shards", type=int, nargs="+", default=[0], help="samples shards to score")
    parser.add_argument("--batch-size", type=int, default=16, help="responses per batch (ReflectConfig default)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the ways, in rotating order")
    args = parser.parse_args(argv)

    import torch

    from leanpo_core import features, frames, io, layout, reflect, schemas

    root, model_dir = common.run_bench_setup(args)
    run = layout.RunLayout(str(root))
    videos = {row["id"]: row for row in io.read_table(run.videos, schemas.VIDEOS).select(
        ["id", "video", "answer"]).to_pylist()}
    found = io.shard_uris(run.samples)
    samples = [row for i in args.shards for row in io.read_table(found[i], schemas.SAMPLES).to_pylist()]
    items, failures = reflect.prepare_shard(samples, videos, frames.FrameStore(run.frames))
    from leanpo_core import scoring

    model, processor, adapter = scoring.load_scoring_model(model_dir, "fp32", "cpu")

    def positions(share: bool) -> int:
        return sum(int(batch["input_ids"].numel()) for _, batch in reflect.scoring_batches(
            processor, adapter, items, args.batch_size, "cpu", share))

    def score(way: str) -> list[tuple[float, int]]:
        cache = None if way == "separate" else features.FeatureCache(2**31)
        return reflect.sft_scores(model, processor, adapter, items, args.batch_size, cache, way == "shared")

    reference = score("separate")  # also the warm-up
    times = {w: [] for w in WAYS}
    diffs = {w: 0.0 for w in WAYS}
    for r in range(args.rounds):
        for way in WAYS[r % len(WAYS):] + WAYS[:r % len(WAYS)]:
            start = time.perf_counter()
            got = score(way)
            times[way].append(time.perf_counter() - start)
            diffs[way] = max([diffs[way], *(abs(a - b) for (a, _), (b, _) in zip(got, reference) if a == a)])
    seconds = {w: common.median(times[w]) for w in WAYS}
    lm_positions = {"separate": positions(False), "cached": positions(False), "shared": positions(True)}
    questions = len({(it["id"], it["round"]) for it in items})
    clips = len({it["video_key"] for it in items})
    rows = [[w, f"{seconds[w]:.2f}", f"{len(items) / seconds[w]:.1f}", f"{seconds['separate'] / seconds[w]:.2f}x",
             f"{lm_positions[w]}", f"{diffs[w]:.1e}"] for w in WAYS]
    body = [f"Candidates: {len(items)} responses to {questions} questions on {clips} clips (samples shard(s) "
            f"{args.shards} of `{common.run_relative(str(root), root)}`, {len(failures)} failure rows); model "
            f"`{common.run_relative(model_dir, root)}` (fp32, CPU); batch size {args.batch_size} responses; "
            f"{common.versions('torch', 'transformers')}; {torch.get_num_threads()} torch threads; median of "
            f"{args.rounds} rounds in rotating order after a warm-up.", "",
            *common.table(["way", "seconds", "responses/s", "speed-up vs separate", "LM input positions",
                           "max |rbar - separate|"], rows)]
    text = common.write_result("scoring", "Likelihood scoring: separate rows, feature cache, shared prompts",
                               common.command_line("scoring_bench.py", argv), body)
    common.write_json("scoring", {"responses": len(items), "questions": questions, "clips": clips,
                                  "batch_size": args.batch_size,
                                  "ways": {w: {"seconds": seconds[w], "responses_per_s": len(items) / seconds[w],
                                               "speedup_over_separate": seconds["separate"] / seconds[w],
                                               "lm_positions": lm_positions[w], "max_abs_rbar_diff": diffs[w]}
                                           for w in WAYS}})
    print(text)
    return text


if __name__ == "__main__":
    main()
