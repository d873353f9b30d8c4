"""Scoring precision: how often bf16 weights change the trust filter's decision and the ranking, against fp32.

    .venv/bin/python bench/scoring_precision_bench.py [--refresh-clips 600] [--batch-size 16]
    python bench/scoring_precision_bench.py --model /models/sft --device cuda     # the same on a GPU, your model

The reflect stage scores every candidate with the SFT model (rbar, the mean response-token log-prob); the trust
filter keeps a pair iff rbar(chosen) - rbar(rejected) > min_trust_gap. This scores the same candidates, same inputs,
once with fp32 weights and once with bf16 weights (`ReflectConfig.scoring_precision` fp32 vs
bf16-weights-fp32-softmax, loaded by `scoring.load_scoring_model`; log-softmax and sums in fp32 either way) and
runs the project's own code on both: `reflect.scored_rows` (score, `assign_ranks`) and `pairs.select_pairs`
(chosen/rejected selection, `drop_reason`), with
  demo ranking        the demo's ReflectConfig (judge off, rank by token F1: rbar does not enter the ranking) and
                      the default PairsConfig (trust filter on, min_trust_gap 0);
  rbar in the score   the same with sft_logp_weight 1.0, so rbar also orders the candidates of a side.
Reported per input: pairs, kept pairs under each precision, the share of pairs whose kept/dropped decision flips,
whose (chosen, rejected) selection changes, and of sides (id, side groups with at least two different replies)
whose rank order changes, each with a 95% Wilson interval; |delta log-prob| per response token, per candidate
(rbar) and per pair (the trust gap); and how the flipped pairs' fp32 gaps compare with the bf16 noise.

Inputs, both made here with the project's stages (`python -m leanpo_core.frames`, `leanpo_core.sample`: vLLM on
CPU) and the demo's settings (`flows.demo`: 8 frames, K = 2 candidates per side, at most 8 new tokens), cached in
bench/.cache/scoring_precision/ and reused on a rerun:
  demo      the demo's candidates: the toy world's train split (`leanpo demo` samples exactly these questions);
  refresh   a larger synthetic refresh: --refresh-clips new synthetic clips (seed --refresh-seed, uniform scenes,
            3 questions per clip), sampled the same way.
The model (sampling and scoring) is the toy world's SFT model by default (`toyworld.ensure_world`: Qwen2-VL-shaped,
LLM hidden 128 x 4 layers, vocabulary 1360), scoring on CPU; docs/operations.md ("Scoring precision") says what
that does and does not say about a 7B model on a GPU, which --model and --device measure directly (the sampling
settings stay the demo's: short replies). Scoring times are wall-clock seconds of `reflect.sft_scores`, with whatever
else runs on the machine. Writes bench/results/scoring_precision.md and scoring_precision.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

NAME = "scoring_precision"
PRECISIONS = ("fp32", "bf16-weights-fp32-softmax")
STAGE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------- inputs


def _write_yaml(path: Path, config) -> str:
    import yaml

    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=True))
    return str(path)


def make_candidates(root: Path, manifest_of, model: str) -> Path:
    """root/{videos.parquet, frames, samples} from the manifest `manifest_of(data_dir)` writes, through the frames
    and sample stages with the demo's settings; reused when root/samples is complete."""
    from flows.demo import FRAMES, SAMPLE
    from leanpo_core import io, launch, videos
    from leanpo_core.config import SampleConfig

    samples = root / "samples"
    if (root / "done").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    manifest = manifest_of(root / "data")
    rows = [r for r in videos.read_videos(str(manifest)) if r["split"] == "train"]
    videos.write_videos(rows, str(root / "videos.parquet"))
    frames_cfg = _write_yaml(root / "frames.yaml", FRAMES)
    sample_cfg = _write_yaml(root / "sample.yaml", SampleConfig(model=model, **SAMPLE))
    log = lambda line: print("    " + line, flush=True)  # noqa: E731
    launch.run_module("leanpo_core.frames", ["run", "--videos", str(root / "videos.parquet"), "--frames",
                                             str(root / "frames"), "--failures", str(root / "failures" / "frames"),
                                             "--config", frames_cfg, "--no-progress"], env=STAGE_ENV, log=log)
    launch.run_module("leanpo_core.sample", ["--config", sample_cfg, "--root", str(root), "--no-progress"],
                      env=STAGE_ENV, log=log)
    assert io.shard_uris(str(samples)), f"no samples under {samples}"
    (root / "done").write_text("")
    return root


def load_items(root: Path) -> tuple[list[dict], dict, dict]:
    """(scoring items of every candidate, as the reflect stage prepares them; videos by id; frames rows by key)."""
    from leanpo_core import frames, io, reflect, schemas

    videos = {r["id"]: r for r in io.read_table(str(root / "videos.parquet"), schemas.VIDEOS).to_pylist()}
    store = frames.FrameStore(str(root / "frames"))
    items = []
    for _, uri in sorted(io.shard_uris(str(root / "samples")).items()):
        got, failures = reflect.prepare_shard(io.read_table(uri, schemas.SAMPLES).to_pylist(), videos, store)
        assert not failures, failures[:1]
        items += got
    return items, videos, store.rows


# ---------------------------------------------------------------- scoring


@dataclasses.dataclass
class Scored:
    sft: list[tuple[float, int]]  # (rbar, tokens) per item, as reflect.sft_scores returns them
    tokens: list[np.ndarray]  # per-token log-probs per item
    seconds: float
    dtypes: list[str]


def score(model_dir: str, precision: str, items: list[dict], batch_size: int, device: str = "cpu") -> Scored:
    """rbar (the stage's own `reflect.sft_scores`) and the per-token log-probs behind it, under one precision."""
    import torch

    from leanpo_core import logps, models, reflect, scoring

    model, processor, adapter = scoring.load_scoring_model(model_dir, precision, device)
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    start = time.perf_counter()
    sft = reflect.sft_scores(model, processor, adapter, items, batch_size)
    seconds = time.perf_counter() - start
    tokens: list[np.ndarray] = [np.zeros(0)] * len(items)
    head = models.output_projection(model)
    with torch.no_grad():
        for chunk, batch in reflect.scoring_batches(processor, adapter, items, batch_size, model.device):
            hidden = models.backbone_hidden_states(model, batch)
            rows, positions, targets = logps.response_positions(batch["labels"])
            values = logps.token_logps(hidden[rows, positions], head.weight, targets).double().cpu().numpy()
            for j, i in enumerate(chunk):
                tokens[i] = values[(rows == j).cpu().numpy()]
    for i, (mean, count) in enumerate(sft):  # the per-token pass is the stage's computation, token by token
        assert count == len(tokens[i]) and abs(tokens[i].mean() - mean) < 1e-5, (i, mean, tokens[i])
    return Scored(sft, tokens, seconds, dtypes)


# ---------------------------------------------------------------- comparison


def _share(k: int, n: int) -> dict:
    from leanpo_core import stats

    low, high = stats.wilson_interval(k, n) if n else (float("nan"), float("nan"))
    return {"k": k, "n": n, "share": k / n if n else float("nan"), "ci_low": low, "ci_high": high}


def _summary(values: np.ndarray) -> dict:
    return {"max": float(values.max()), "median": float(np.median(values)), "p99": float(np.quantile(values, 0.99)),
            "mean": float(values.mean())}


def compare(items: list[dict], base: Scored, other: Scored, videos: dict, frame_rows: dict) -> dict:
    """Flip shares and |delta| statistics of `other` against `base` under both rankings."""
    from flows.demo import REFLECT
    from leanpo_core import pairs, reflect
    from leanpo_core.config import PairsConfig, ReflectConfig

    token_delta = np.concatenate([np.abs(a - b) for a, b in zip(base.tokens, other.tokens)])
    rbar_delta = np.abs(np.array([m for m, _ in base.sft]) - np.array([m for m, _ in other.sft]))
    judged = [(None, None, "off")] * len(items)
    configs = {"demo ranking": REFLECT,
               "rbar in the score": ReflectConfig(**{**REFLECT.model_dump(), "sft_logp_weight": 1.0})}
    out = {"candidates": len(items), "response_tokens": int(token_delta.size),
           "token_abs_delta": _summary(token_delta), "rbar_abs_delta": _summary(rbar_delta), "rankings": {}}
    for label, config in configs.items():
        rows_a, failed_a = reflect.scored_rows(items, base.sft, judged, config, "fp32")
        rows_b, failed_b = reflect.scored_rows(items, other.sft, judged, config, "bf16")
        assert not failed_a and not failed_b
        pairs_a = pairs.select_pairs(rows_a, videos, frame_rows, PairsConfig())
        pairs_b = pairs.select_pairs(rows_b, videos, frame_rows, PairsConfig())
        assert [p["pair_id"] for p in pairs_a] == [p["pair_id"] for p in pairs_b]
        n = len(pairs_a)
        decision = [a["pair_id"] for a, b in zip(pairs_a, pairs_b) if a["kept"] != b["kept"]]
        selection = sum((a["chosen"], a["rejected"]) != (b["chosen"], b["rejected"]) for a, b in zip(pairs_a, pairs_b))
        both = [(a, b) for a, b in zip(pairs_a, pairs_b)
                if None not in (a["chosen_sft_logp"], a["rejected_sft_logp"])]  # a side with no candidate: no gap
        gap = {a["pair_id"]: a["chosen_sft_logp"] - a["rejected_sft_logp"] for a, _ in both}
        same = [(a, b) for a, b in both if (a["chosen"], a["rejected"]) == (b["chosen"], b["rejected"])]
        gap_delta = np.abs(np.array([(b["chosen_sft_logp"] - b["rejected_sft_logp"])
                                     - (a["chosen_sft_logp"] - a["rejected_sft_logp"]) for a, b in same]))
        # sides whose rank order changes, among sides with at least two different replies (the order of identical
        # replies is a tie, broken by candidate index under either precision)
        groups: dict[tuple, list] = {}
        for ra, rb in zip(rows_a, rows_b):
            assert (ra["id"], ra["side"], ra["candidate"]) == (rb["id"], rb["side"], rb["candidate"])
            groups.setdefault((ra["id"], ra["round"], ra["side"]), []).append((ra, rb))
        varied = [g for g in groups.values() if len({ra["response"] for ra, _ in g}) > 1]
        reordered = sum([ra["rank"] for ra, _ in g] != [rb["rank"] for _, rb in g] for g in varied)
        abs_gaps = np.abs(np.array(list(gap.values())))
        flipped_gaps = [abs(gap[p]) for p in decision]
        noise = float(gap_delta.max()) if gap_delta.size else 0.0
        out["rankings"][label] = {
            "pairs": n, "kept_fp32": sum(p["kept"] for p in pairs_a), "kept_bf16": sum(p["kept"] for p in pairs_b),
            "decision_flips": _share(len(decision), n), "selection_changes": _share(selection, n),
            "sides_reordered": _share(reordered, len(varied)),
            "gap_abs_delta": _summary(gap_delta) if gap_delta.size else None,
            "flipped_fp32_abs_gap_max": max(flipped_gaps) if flipped_gaps else None,
            "pairs_within_max_gap_delta": _share(int((abs_gaps <= noise).sum()), n),
            "identical_reply_pairs": sum(p["chosen"] == p["rejected"] for p in pairs_a),
        }
    return out


# ---------------------------------------------------------------- report


def _pct(s: dict) -> str:
    return f"{100 * s['share']:.2f}% ({s['k']}/{s['n']}; {100 * s['ci_low']:.2f}-{100 * s['ci_high']:.2f})"


def report(results: dict, model: str, args: argparse.Namespace) -> list[str]:
    what = "" if args.model else (" (the toy world's SFT model: Qwen2-VL-shaped, LLM hidden 128 x 4 layers, "
                                  "vocabulary 1360)")
    body = [f"Scoring model: {common.display_path(model)}{what}, {args.device}, batch size {args.batch_size}; each input's candidates "
            "scored with fp32 weights and with bf16 weights (`scoring_precision: bf16-weights-fp32-softmax`), same "
            "inputs; pairs and ranks from the project's `reflect.scored_rows` and `pairs.select_pairs` (trust "
            "filter on, min_trust_gap 0). Shares with 95% Wilson intervals.", ""]
    rows = []
    for name, r in results["inputs"].items():
        for label, k in r["rankings"].items():
            rows.append([name, str(r["candidates"]), label, str(k["pairs"]), f"{k['kept_fp32']} / {k['kept_bf16']}",
                         _pct(k["decision_flips"]), _pct(k["selection_changes"]), _pct(k["sides_reordered"])])
    body += common.table(["input", "candidates", "ranking", "pairs", "kept fp32 / bf16", "trust decision flips",
                          "chosen/rejected selection changes", "sides reordered"], rows)
    body += ["", "|delta| between fp32 and bf16 weights (nats):", ""]
    rows = []
    for name, r in results["inputs"].items():
        k = r["rankings"]["demo ranking"]
        t, c, g = r["token_abs_delta"], r["rbar_abs_delta"], k["gap_abs_delta"]
        flipped = k["flipped_fp32_abs_gap_max"]
        rows.append([name, str(r["response_tokens"]), f"{t['max']:.4f} / {t['median']:.2e} / {t['p99']:.4f}",
                     f"{c['max']:.4f} / {c['median']:.2e}", f"{g['max']:.4f} / {g['median']:.2e}",
                     "-" if flipped is None else f"{flipped:.4f}", _pct(k["pairs_within_max_gap_delta"]),
                     f"{r['seconds']['fp32']:.1f} / {r['seconds']['bf16-weights-fp32-softmax']:.1f}"])
    body += common.table(["input", "response tokens", "per token: max / median / p99", "per candidate (rbar): "
                          "max / median", "per pair (trust gap): max / median", "largest fp32 |gap| of a flipped "
                          "pair", "pairs with fp32 |gap| <= the largest gap delta", "scoring s fp32 / bf16"],
                         rows)
    body += ["", "Pairs whose chosen and rejected replies are the same text have a gap of exactly 0 under both "
             "precisions and are dropped under both: " + ", ".join(
                 f"{name} {r['rankings']['demo ranking']['identical_reply_pairs']}"
                 for name, r in results["inputs"].items()) + ". Under the demo ranking rbar does not enter the "
             "score, so selection and rank order cannot change by construction; the rbar-in-the-score rows are "
             "where they can."]
    return body


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refresh-clips", type=int, default=600, help="synthetic clips of the larger refresh")
    parser.add_argument("--refresh-seed", type=int, default=1, help="seed of the larger refresh's clips")
    parser.add_argument("--batch-size", type=int, default=16, help="candidates per forward (the demo's 16)")
    parser.add_argument("--model", help="model that samples and scores (default: the toy world's SFT model)")
    parser.add_argument("--device", default="cpu", help="where the model scores: cpu or cuda (default cpu)")
    args = parser.parse_args(argv)
    command = common.command_line("scoring_precision_bench.py", argv)

    from leanpo_core import synthetic, toyworld

    cache = common.ensure_cache() / NAME
    model = args.model or str(toyworld.ensure_world(common.ensure_cache() / "toy-world"))
    tag = "" if not args.model else "-" + hashlib.sha256(model.encode()).hexdigest()[:8]  # one cache per model
    inputs = {
        "demo": lambda data: toyworld.manifest(data, only=("train",)),
        "refresh": lambda data: synthetic.generate(data, num=args.refresh_clips, seed=args.refresh_seed,
                                                   questions_per_clip=3, splits=(("train", 1.0),)),
    }
    results = {"model": common.display_path(model), "device": args.device, "batch_size": args.batch_size,
               "refresh_clips": args.refresh_clips, "refresh_seed": args.refresh_seed, "inputs": {}}
    for name, manifest_of in inputs.items():
        folder = name if name == "demo" else f"refresh-{args.refresh_clips}-{args.refresh_seed}"
        root = make_candidates(cache / (folder + tag), manifest_of, model)
        items, videos, frame_rows = load_items(root)
        print(f"{name}: {len(items)} candidates", flush=True)
        scored = {p: score(model, p, items, args.batch_size, args.device) for p in PRECISIONS}
        result = compare(items, scored["fp32"], scored["bf16-weights-fp32-softmax"], videos, frame_rows)
        result["seconds"] = {p: s.seconds for p, s in scored.items()}
        result["dtypes"] = {p: s.dtypes for p, s in scored.items()}
        results["inputs"][name] = result
    body = report(results, model, args)
    print(common.write_result(NAME, "Scoring precision: fp32 vs bf16 weights on the trust filter and the ranking",
                              command, body))
    common.write_json(NAME, {"command": command, **results})
    return results


if __name__ == "__main__":
    main()
