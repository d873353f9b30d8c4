"""Evaluate: held-out preference accuracy, answer accuracy, and the likelihood of held-out ground-truth answers.

For a trained `model` (and, optionally, a `baseline` such as the SFT model it started from), on held-out data:
  preference_accuracy  share of the KEPT pairs of a pairs table where rbar(chosen) > rbar(rejected) under the model
                       (a tie counts as wrong); preference_margin is the mean rbar(chosen) - rbar(rejected);
  answer_accuracy      questions of the videos table's `split` (EvaluateConfig.split) whose `source` is "synthetic",
                       answered greedily through the generation engine (vLLM wherever it imports) from the clean
                       frames and the plain question, counted correct by `answer_match` (one-word exact answers);
  answer_f1            the same for every other source, scored by SQuAD token F1 (free-form answers);
  answer_logp          mean over those questions of rbar(ground-truth answer) under the model;
  answer_logp_change   (with a baseline) the mean of rbar_model(answer) - rbar_baseline(answer) over the same
                       answers: positive means the model made the true answers more likely (docs/method.md section 1's
                       likelihood-displacement question, asked on held-out data);
  answer_accuracy/<category>   the accuracy per question type (synthetic: colour, direction, shape, count);
  answer_accuracy_change       (with a baseline) model minus baseline on the same questions, its 95% interval from
                       a paired bootstrap and, in `details`, the exact McNemar p-value (`leanpo_core.stats`).
Accuracies carry a 95% Wilson interval in `ci_low`/`ci_high`. Every answer, right or wrong, is a row of the ANSWERS
table next to the evaluation table (`<name>.answers.parquet`), so a reader can see what each model said.
With `EvaluateConfig.benchmark` (a local or S3 copy of Video-MME, MVBench or NExT-QA in its published layout,
`leanpo_core.benchmarks`), both models also answer the benchmark's questions, asked and read as the benchmark does,
from frames the frames stage decodes once into `benchmark_frames` and through the same engine:
  <benchmark>_accuracy                 share of its questions answered right (a malformed reply is wrong), split
                                       = the benchmark's name; details: malformed, questions left out and why, mean
                                       frames, prompt tokens and reply tokens per question;
  <benchmark>_accuracy/<axis>=<value>  the same per category (Video-MME: duration, domain, task_type; MVBench:
                                       task; NExT-QA: type and its group);
  <benchmark>_accuracy_change          (with a baseline) model minus baseline, paired as answer_accuracy_change.
Each benchmark reply, its extracted letter and its cost are rows of `<name>.benchmark.parquet` (BENCHMARK_ANSWERS).
rbar is the mean token log-prob of a response given the clean frames and the plain question, end-of-reply token
included, computed on the lean path (`logps.model_response_logps`, response-only logits, log-softmax in fp32;
weights in `EvaluateConfig.scoring_precision`) exactly as the reflect stage and the trainer score. The baseline is
evaluated on every metric too, so the report compares the two.

Writes the EVALUATION table (one row per model and metric; `n` is the number of items behind the value, `details`
a small JSON object) and a markdown report next to it (`<out minus .parquet>.md`). All likelihood scoring runs
before any engine opens: vLLM on CPU pins the process's OpenMP threads. Held-out sets are small: their frames are
held in memory together (a benchmark's, 256 questions at a time).

    python -m leanpo_core.evaluate --model runs/r1/train/leanpo/final --baseline /tmp/toy-qwen2vl --root runs/r1
    python -m leanpo_core.evaluate --model M --root s3://bucket/r1 --config eval.yaml --run-id leanpo-vs-sft \\
        --out s3://bucket/r1/evaluation/leanpo-vs-sft.parquet
"""

from __future__ import annotations

import json
import math
import posixpath
import sys
from pathlib import Path
from typing import Any

import numpy as np

from leanpo_core import (benchmarks, features, frames, io, prompts, reflect, schemas, scoring, stagecli, stats,
                         synthetic)
from leanpo_core.config import EvaluateConfig
from leanpo_core.layout import RunLayout, table_arguments

MATCH_RULE = ("normalised response == normalised answer, or the normalised answer's tokens appear as a contiguous "
              "whole-word phrase in the normalised response (SQuAD normalisation)")
METRICS = ("preference_accuracy", "preference_margin", "answer_accuracy", "answer_accuracy_change", "answer_f1",
           "answer_logp", "answer_logp_change")


def answer_match(response: str, answer: str) -> bool:
    """True when `response` gives `answer`, after `reflect.normalize_answer` (lowercase, no punctuation or articles).

    A match is an equal normalised text, or the answer's normalised tokens found as a contiguous run of whole
    tokens in the response. Worked cases:
        "Red."                    vs "red"        -> True   (both normalise to "red")
        "The moving shape is red." vs "red"       -> True   ("red" is a whole token of the response)
        "It moves to the LEFT!"   vs "left"       -> True
        "reddish"                 vs "red"        -> False  (a token must match whole)
        "There are 13 squares"    vs "3"          -> False
        "a red big square"        vs "red square" -> False  (the phrase must be contiguous)
        "red or blue"             vs "red"        -> True   (a hedge that names the answer counts: the rule is lenient)
        ""                        vs "red"        -> False; "" vs "" -> True
    """
    said, truth = reflect.normalize_answer(response), reflect.normalize_answer(answer)
    if said == truth:
        return True
    return bool(truth) and f" {truth} " in f" {said} "


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _row(run_id: str, model: str, split: str, metric: str, value: float, n: int, **details: Any) -> dict:
    return {"run_id": run_id, "model": model, "split": split, "metric": metric, "value": float(value), "n": int(n),
            "details": json.dumps(details, sort_keys=True) if details else None}


def _select(clip: np.ndarray, row: dict, indices: list[int]) -> np.ndarray:
    """The frames of `clip` at source `indices` (all of it when they are the row's own)."""
    if list(indices) == list(row["frame_indices"]):
        return clip
    position = {index: i for i, index in enumerate(row["frame_indices"])}
    return clip[[position[i] for i in indices]]


def heldout_pairs(pairs_uri: str, store: frames.FrameStore, options: io.StorageOptions | None) -> tuple[list, dict]:
    """(scoring items for the kept pairs: two per pair, chosen then rejected; counts for the details column)."""
    pairs = [p for p in io.read_table(pairs_uri, schemas.PAIRS, options).to_pylist() if p["kept"]]
    loaded = store.load(sorted({p["video_key"] for p in pairs}))
    items, missing = [], 0
    for pair in pairs:
        if pair["video_key"] not in loaded:
            missing += 1
            continue
        clip, row = loaded[pair["video_key"]]
        for side in ("chosen", "rejected"):
            indices = pair[f"{side}_frame_indices"]
            pixels = _select(clip, row, indices)
            items.append({"id": pair["id"], "video_key": pair["video_key"], "question": pair["prompt"],
                          "response": pair[side], "frames": pixels,
                          "meta": frames.frames_metadata(row, pixels, indices),
                          "finish_reason": pair[f"{side}_finish_reason"]})
    return items, {"pairs_kept": len(pairs), "missing_frames": missing}


def heldout_questions(videos_uri: str, store: frames.FrameStore, config: EvaluateConfig,
                      options: io.StorageOptions | None) -> tuple[list[dict], dict]:
    """(items of the held-out split: question, ground-truth answer as `response`, source, frames, meta; counts)."""
    rows = [r for r in io.read_table(videos_uri, schemas.VIDEOS, options).to_pylist() if r["split"] == config.split]
    if config.max_questions:
        rows = rows[:config.max_questions]
    keys = {r["video"]: store.key_for(r["video"]) for r in rows}
    loaded = store.load(sorted({k for k in keys.values() if k}))
    items = []
    for r in rows:
        if keys[r["video"]] not in loaded:
            continue
        clip, row = loaded[keys[r["video"]]]
        items.append({"id": r["id"], "video_key": keys[r["video"]], "question": r["question"],
                      "response": r["answer"], "answer": r["answer"],
                      "source": r["source"] or "", "frames": clip, "meta": frames.frames_metadata(row, clip),
                      "finish_reason": "stop"})
    return items, {"questions": len(rows), "missing_frames": len(rows) - len(items)}


def score(model_dir: str, items: list[dict], config: EvaluateConfig, frames_uri: str = "",
          options: io.StorageOptions | None = None) -> list[float]:
    """rbar of each item's response under `model_dir` (lean path, `config.scoring_precision`), in `items` order.
    `frames_uri`: the frames table the items come from (where persisted features live)."""
    if not items:
        return []
    model, processor, adapter = scoring.load_scoring_model(model_dir, config.scoring_precision, config.device)
    try:
        persist = config.persist_vision_features and bool(frames_uri)
        # one per loaded model: the in-memory cache is keyed by the model object
        cache = features.new_cache(config.vision_feature_cache_mib, persist, frames_uri, options)
        scores = reflect.sft_scores(model, processor, adapter, items, config.batch_size, cache, config.prefix_sharing)
        if cache is not None and cache.store is not None:
            print(f"evaluate: {Path(model_dir).name}: {cache.summary()}", file=sys.stderr, flush=True)
        return [mean for mean, _ in scores]
    finally:
        del model
        reflect.free_memory()


def _answer(engine, items: list[dict], config: EvaluateConfig, max_tokens: int) -> list:
    """One greedy completion (`engine.Completion`) per item's plain question."""
    from leanpo_core.engine import Request

    requests = [Request(prompt=engine.adapter.build_prompt(engine.processor, prompts.plain_prompt(it["question"])),
                        frames=it["frames"], meta=it["meta"], n=1, temperature=0.0, top_p=1.0,
                        max_tokens=max_tokens, seed=config.seed) for it in items]
    return [completions[0] for completions in engine.generate(requests)]


def generate_answers(model_dir: str, items: list[dict], config: EvaluateConfig,
                     benchmark: benchmarks.Prepared | None = None) -> tuple[list[str], list]:
    """Greedy answers of `model_dir`, through one generation engine: (the text of each item's answer to its plain
    question; the completion of each of the benchmark's questions, asked chunk by chunk with the benchmark's own
    generation length)."""
    from leanpo_core.engine import open_engine

    asked = benchmark is not None and bool(benchmark.questions)
    if not items and not asked:
        return [], []
    bench_tokens = (benchmark.layout.max_new_tokens or config.max_new_tokens) if asked else 0
    engine = open_engine(model_dir, backend=config.backend, seed=config.seed, max_model_len=config.max_model_len,
                         max_tokens_hint=max(config.max_new_tokens, bench_tokens))
    try:
        texts = [c.text for c in _answer(engine, items, config, config.max_new_tokens)] if items else []
        replies = [c for chunk in benchmark.items() for c in _answer(engine, chunk, config, bench_tokens)] \
            if asked else []
        return texts, replies
    finally:
        engine.close()


def preference_rows(run_id: str, model: str, split: str, rbar: list[float], counts: dict) -> list[dict]:
    """preference_accuracy and preference_margin from rbar of (chosen, rejected, chosen, rejected, ...)."""
    margins = [c - r for c, r in zip(rbar[0::2], rbar[1::2])]
    wins = [m > 0 for m in margins]
    return [_row(run_id, model, split, "preference_accuracy", _mean(wins), len(wins), **counts),
            _row(run_id, model, split, "preference_margin", _mean(margins), len(margins), **counts)]


def category_of(item: dict) -> str:
    """The category an answer is reported under: the question type for synthetic questions, else the source."""
    if item["source"] == "synthetic":
        return synthetic.question_type(item["question"])
    return item["source"] or "other"


def answer_records(run_id: str, model: str, split: str, items: list[dict], responses: list[str],
                   answer_rbar: list[float]) -> list[dict]:
    """ANSWERS rows: each question's response, its category, and whether it is right (exact items) or its F1."""
    records = []
    for it, response, logp in zip(items, responses, answer_rbar or [None] * len(items), strict=True):
        exact = it["source"] == "synthetic"
        records.append({"run_id": run_id, "model": model, "split": split, "id": it["id"],
                        "category": category_of(it), "question": it["question"], "answer": it["answer"],
                        "response": response, "correct": answer_match(response, it["answer"]) if exact else None,
                        "f1": reflect.token_f1(response, it["answer"]), "answer_logp": logp})
    return records


def answer_rows(run_id: str, model: str, split: str, records: list[dict], counts: dict) -> list[dict]:
    """answer_accuracy (exact items, `answer_match`) with its Wilson interval, overall and per category
    (`answer_accuracy/<category>`), and answer_f1 (other items, token F1)."""
    exact = [r for r in records if r["correct"] is not None]
    f1 = [r["f1"] for r in records if r["correct"] is None]
    summary = stats.accuracy_summary([r["correct"] for r in exact], [r["category"] for r in exact])
    rows = []
    for name, s in summary.items():
        metric = "answer_accuracy" if name == "all" else f"answer_accuracy/{name}"
        extra = {"rule": MATCH_RULE, **counts} if name == "all" else {}
        rows.append({**_row(run_id, model, split, metric, s["value"], s["n"], **extra),
                     "ci_low": s["ci_low"], "ci_high": s["ci_high"]})
    return rows + [_row(run_id, model, split, "answer_f1", _mean(f1), len(f1), **counts)]


def change_row(run_id: str, model: str, baseline: str, split: str, model_records: list[dict],
               baseline_records: list[dict], metric: str = "answer_accuracy_change") -> dict:
    """answer_accuracy_change (or `metric`): model minus baseline on the same exact-answer questions, with its
    paired-bootstrap 95% interval; details hold the exact McNemar p-value and how many questions each model alone
    got right."""
    right = {r["id"]: r["correct"] for r in baseline_records if r["correct"] is not None}
    pairs = [(right[r["id"]], r["correct"]) for r in model_records if r["id"] in right]
    result = stats.paired_difference([float(b) for b, _ in pairs], [float(a) for _, a in pairs])
    return {**_row(run_id, model, split, metric, result["delta"], result["n"], baseline=baseline,
                   p_value=result["p_value"], gained=result["gained"], lost=result["lost"],
                   interval="paired bootstrap, 10000 resamples of the questions"),
            "ci_low": result["ci_low"], "ci_high": result["ci_high"]}


def benchmark_records(run_id: str, model: str, bench: benchmarks.Prepared, completions: list) -> list[dict]:
    """BENCHMARK_ANSWERS rows: each benchmark question's reply, the letter read from it, and what it cost."""
    name = bench.layout.name
    scored = benchmarks.score(name, bench.questions, [c.text for c in completions])
    return [{"run_id": run_id, "model": model, "benchmark": name, **r, "categories": json.dumps(r["categories"]),
             "frames": bench.frames_of(q), "prompt_tokens": len(c.prompt_token_ids), "reply_tokens": c.num_tokens}
            for r, q, c in zip(scored, bench.questions, completions, strict=True)]


def benchmark_rows(run_id: str, model: str, bench: benchmarks.Prepared, records: list[dict]) -> list[dict]:
    """<benchmark>_accuracy overall (details: the rule, malformed replies, questions left out, cost per question)
    and per category, each with n and its Wilson interval."""
    name = bench.layout.name
    cost = {f"{k}_per_question": _mean([r[k] for r in records]) for k in ("frames", "prompt_tokens", "reply_tokens")}
    rows = []
    for key, s in benchmarks.summarize(name, [{**r, "categories": json.loads(r["categories"])}
                                              for r in records]).items():
        metric = f"{name}_accuracy" if key == "all" else f"{name}_accuracy/{key}"
        extra = dict(benchmark=bench.root, rule=bench.layout.rule, malformed=sum(r["extracted"] is None
                     for r in records), **bench.counts, **cost) if key == "all" else {}
        rows.append({**_row(run_id, model, name, metric, s["value"], s["n"], **extra),
                     "ci_low": s["ci_low"], "ci_high": s["ci_high"]})
    return rows


def _split_label(pair_items: list[dict], videos_uri: str, options: io.StorageOptions | None) -> str:
    """The videos-table split(s) the pairs' questions come from, e.g. "test" ("pairs" when none is known)."""
    split_of = {r["id"]: r["split"] for r in io.read_table(videos_uri, schemas.VIDEOS, options)
                .select(["id", "split"]).to_pylist()}
    found = sorted({split_of.get(it["id"]) or "" for it in pair_items} - {""})
    return "+".join(found) or "pairs"


def run_evaluate(model: str, videos_uri: str, frames_uri: str, pairs_uri: str | None, out_uri: str,
                 config: EvaluateConfig, run_id: str, baseline_model: str | None = None,
                 options: io.StorageOptions | None = None) -> io.Manifest:
    """Evaluate `model` (and `baseline_model`) and write the EVALUATION table to out_uri plus its markdown report.

    pairs_uri: a pairs table of held-out questions (None: no preference metrics). Returns the table's manifest.
    """
    store = frames.FrameStore(frames_uri, options)
    bench = None
    if config.benchmark:
        bench = benchmarks.prepare(config.benchmark, config.benchmark_layout, config.benchmark_num_frames,
                                   config.benchmark_max_questions,
                                   config.benchmark_frames or io.join_uri(posixpath.dirname(out_uri), "benchmarks"),
                                   options)
    pair_items, pair_counts = heldout_pairs(pairs_uri, store, options) if pairs_uri else ([], {})
    questions, question_counts = heldout_questions(videos_uri, store, config, options)
    pair_split = _split_label(pair_items, videos_uri, options) if pairs_uri else ""
    models_ = [model] + ([baseline_model] if baseline_model else [])
    # Likelihoods first for every model, generation after: see the module docstring.
    rbars = {}
    for m in models_:  # one load of each model for both passes: its held-out pairs, then the questions
        scores = score(m, pair_items + questions, config, frames_uri, options)
        rbars[m] = (scores[:len(pair_items)], scores[len(pair_items):])
    rows, records, bench_records = [], {}, {}
    for m in models_:
        pair_rbar, answer_rbar = rbars[m]
        if pairs_uri:
            rows += preference_rows(run_id, m, pair_split, pair_rbar, pair_counts)
        responses, replies = generate_answers(m, questions, config, bench)
        records[m] = answer_records(run_id, m, config.split, questions, responses, answer_rbar)
        rows += answer_rows(run_id, m, config.split, records[m], question_counts)
        rows.append(_row(run_id, m, config.split, "answer_logp", _mean(answer_rbar), len(answer_rbar),
                         **question_counts))
        if bench is not None:
            bench_records[m] = benchmark_records(run_id, m, bench, replies)
            rows += benchmark_rows(run_id, m, bench, bench_records[m])
    if baseline_model:
        if any(r["correct"] is not None for r in records[model]):
            rows.append(change_row(run_id, model, baseline_model, config.split, records[model],
                                   records[baseline_model]))
        change = [a - b for a, b in zip(rbars[model][1], rbars[baseline_model][1])]
        rows.append(_row(run_id, model, config.split, "answer_logp_change", _mean(change), len(change),
                         baseline=baseline_model, **question_counts))
        if bench is not None:
            name = bench.layout.name
            rows.append(change_row(run_id, model, baseline_model, name, bench_records[model],
                                   bench_records[baseline_model], f"{name}_accuracy_change"))
    if bench is not None:
        io.write_table([r for m in models_ for r in bench_records[m]], benchmark_answers_uri(out_uri),
                       schemas.BENCHMARK_ANSWERS, options)
    io.write_table([r for m in models_ for r in records[m]], answers_uri(out_uri), schemas.ANSWERS, options)
    manifest = io.write_table(rows, out_uri, schemas.EVALUATION, options)
    io.write_bytes(report_uri(out_uri), report(rows, model, baseline_model, run_id).encode(), options)
    return manifest


def report_uri(out_uri: str) -> str:
    """Where the markdown report of the table at `out_uri` goes: the same name with .md for .parquet."""
    return out_uri.removesuffix(".parquet") + ".md"


def answers_uri(out_uri: str) -> str:
    """Where the per-question ANSWERS table of the evaluation at `out_uri` goes: `<name>.answers.parquet`."""
    return out_uri.removesuffix(".parquet") + ".answers.parquet"


def benchmark_answers_uri(out_uri: str) -> str:
    """Where the BENCHMARK_ANSWERS table of the evaluation at `out_uri` goes: `<name>.benchmark.parquet`."""
    return out_uri.removesuffix(".parquet") + ".benchmark.parquet"


def format_metric(row: dict | None) -> str:
    """"0.512 [0.443, 0.580] (n=200)" (an interval where the row has one); a change in percentage points."""
    if row is None:
        return ""
    value, n = row["value"], row["n"]
    if n == 0 or math.isnan(value):
        return "n/a"
    low, high = row.get("ci_low"), row.get("ci_high")
    if low is None or high is None:
        return f"{value:.4f} (n={n})"
    return stats.format_interval(value, low, high, n, points=row["metric"].endswith("_change"))


def report(rows: list[dict], model: str, baseline: str | None, run_id: str) -> str:
    """A markdown table of the metrics with 95% intervals: a column for the model, then the baseline's."""
    columns = [("model", model)] + ([("baseline", baseline)] if baseline else [])
    values = {(r["model"], r["metric"]): r for r in rows}
    ordered = [m for m in METRICS if any(r["metric"] == m for r in rows)]
    ordered += sorted({r["metric"] for r in rows if r["metric"].startswith("answer_accuracy/")})
    ordered += [m for m in dict.fromkeys(r["metric"] for r in rows) if m not in ordered]  # a benchmark's, in order
    lines = [f"# Evaluation `{run_id}`", ""] + [f"- {label}: `{path}`" for label, path in columns]
    lines += ["", "| metric | split | " + " | ".join(f"{label} `{Path(p).name or p}`" for label, p in columns) + " |",
              "|---|---|" + "---|" * len(columns)]
    for name in ordered:
        split = next(r["split"] for r in rows if r["metric"] == name)
        lines.append(f"| {name} | {split} | " + " | ".join(format_metric(values.get((p, name)))
                                                          for _, p in columns) + " |")
    lines += ["", "Intervals are 95%: Wilson for an accuracy, a paired bootstrap over the same questions for "
              "answer_accuracy_change (its exact McNemar p-value is in the row's details).",
              "rbar: mean token log-prob of a response given the clean frames and the plain question.",
              f"answer_accuracy counts a match when the {MATCH_RULE}; answer_f1 is SQuAD token F1. Each "
              "question's answer is in the `answers` table beside this one."]
    for r in rows:
        if r["model"] == model and r["metric"] == f"{r['split']}_accuracy" and r["split"] in benchmarks.LAYOUTS:
            d = json.loads(r["details"])
            lines.append(f"{r['metric']}: {d['rule']}; a malformed reply is wrong ({d['malformed']} of {r['n']}); "
                         f"{d['missing_video']} questions without a video, {d['undecodable']} undecodable and "
                         f"{d['invalid']} invalid rows left out; per question {d['frames_per_question']:.1f} "
                         f"frames, {d['prompt_tokens_per_question']:.0f} prompt and "
                         f"{d['reply_tokens_per_question']:.1f} reply tokens. Each reply and the letter read from "
                         "it are in the `benchmark` table beside this one; a change is paired like "
                         "answer_accuracy_change.")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> io.Manifest:
    """CLI: evaluate a model (and a baseline) on a run's held-out data (tables from --root, each overridable;
    leanpo_core/stagecli.py)."""
    parser = stagecli.stage_parser("evaluate", __doc__, ("videos", "frames"), EvaluateConfig)
    parser.add_argument("--model", required=True, help="model to evaluate: local folder or hub id")
    parser.add_argument("--baseline", help="model to compare against (e.g. the SFT model); evaluated alike")
    parser.add_argument("--pairs", help="held-out pairs table URI (default: --root's pairs table if it exists)")
    parser.add_argument("--out", help="evaluation table URI (default: <root>/evaluation/<run-id>.parquet); the "
                        "markdown report, the answers and the benchmark replies go next to it")
    parser.add_argument("--run-id", default="eval", help="run id recorded in every row (default: eval)")
    args = parser.parse_args(argv)
    uris = table_arguments(parser, args, "evaluate", ("videos", "frames"))
    layout = RunLayout(args.root) if args.root else None
    out = args.out or (layout and layout.evaluation(args.run_id))
    if not out:
        parser.error("give --out (the evaluation table's URI) unless --root is given")
    config = stagecli.stage_config(args, EvaluateConfig, "evaluate")
    pairs = args.pairs or (layout.pairs if layout and io.exists(layout.pairs) else None)
    manifest = run_evaluate(args.model, uris["videos"], uris["frames"], pairs, out, config, args.run_id,
                            args.baseline)
    lines = [f"evaluation: {manifest.rows} rows -> {manifest.uri} (report: {report_uri(out)})",
             f"answers: -> {answers_uri(out)}"]
    lines += [f"benchmark answers: -> {benchmark_answers_uri(out)}"] if config.benchmark else []
    stagecli.report(args, lines, {"evaluation": manifest.to_dict(), "report": report_uri(out),
                                  "answers": answers_uri(out),
                                  "benchmark_answers": benchmark_answers_uri(out) if config.benchmark else None})
    return manifest


if __name__ == "__main__":
    from leanpo_core.launch import stage_entry

    stage_entry(main)
