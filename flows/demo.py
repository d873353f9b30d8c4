"""The main job on the embedded default, through Prefect with a temporary local server, in the toy world.

The toy world (`leanpo_core.toyworld`) is a tiny Qwen2-VL-shaped SFT model that reads the synthetic clips (shipped
in `leanpo_core/assets/toy_world`, rebuilt by `python -m leanpo_core.toyworld build` when its code changes) and a
synthetic video-QA set with disjoint splits. The demo runs one round of the pipeline from that SFT model: data
refresh on the `train` split (frames -> prior-infused sampling with vLLM: hint, then self-reflection, for the winning
side; the lean augmented 2-frame view without the hint for the losing side -> scoring -> ranked pairs with the
reward-trustworthiness filter), LeanPO training, and evaluation of the trained model against the SFT model on the
`test` split, which nothing was trained or tuned on. It prints the before/after answer accuracy with 95% intervals,
the change with its paired interval and McNemar p-value, per question type, the blind baselines, what the pairs
were made of, and where every table, plot and report is.

    leanpo demo [--workdir runs/demo] [--max-train-questions N] [--max-test-questions N]     # or: make demo
"""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path

from prefect import flow, task

from flows.pipeline import pipeline
from leanpo_core import io, schemas, stats, synthetic, toyworld
from leanpo_core.config import EvaluateConfig, FramesConfig, PairsConfig, ReflectConfig, SampleConfig, TrainConfig
from leanpo_core.evaluate import answer_match, answers_uri, format_metric

FRAMES = FramesConfig(num_frames=toyworld.WorldSettings.frames, max_side=128)
# The toy SFT model was never taught to rate replies, so candidates are ranked by token F1 against the prior
# knowledge and the trust filter (the SFT model's own likelihood) decides which pairs are kept.
# Each clip's vision features are stored beside the frames table once, then read by training and evaluation.
REFLECT = ReflectConfig(judge=False, prior_f1_weight=1.0, batch_size=16, persist_vision_features=True)
# Four candidates per side, chosen with the training budget below on the validation split.
SAMPLE = dict(num_candidates=4, max_new_tokens=8, max_model_len=1024, shard_size=256)
# The method's loss defaults (beta 2, gamma 0.5, eps 0.1, d 0, lambda_sft 0.5); a learning rate and epochs for a
# 1 M-parameter model trained for seconds, chosen on the world's validation split (experiments/toy_world.py,
# BUDGET_SELECTION), and no DeepSpeed or checkpointing on CPU.
LEANPO = dict(objective="leanpo", learning_rate=5e-4, warmup_ratio=0.1, epochs=4, per_device_batch_size=8,
              deepspeed="none", gradient_checkpointing=False, save_steps=100000, seed=0, persist_vision_features=True)
EVALUATE = dict(split="test", max_new_tokens=8, max_model_len=1024, batch_size=16, persist_vision_features=True)


@task
def world_model(cache: str) -> str:
    """The toy world's SFT model: the shipped one when its content key matches the code, else built (minutes)."""
    return str(toyworld.ensure_world(cache))


@task
def world_set(folder: str, max_train: int = 0, max_test: int = 0) -> str:
    """The world's clips of the `train` and `test` splits and their manifest (first N questions of each with caps)."""
    manifest = toyworld.manifest(folder, only=("train", "test"))
    if not max_train and not max_test:
        return str(manifest)
    return str(toyworld.first_questions(manifest, {"train": max_train, "test": max_test},
                                        Path(folder) / f"manifest-{max_train}-{max_test}.jsonl"))


@flow(name="leanpo-demo", log_prints=True)
def demo(workdir: str, max_train_questions: int = 0, max_test_questions: int = 0) -> dict:
    """Toy world SFT model + synthetic clips -> one pipeline round (refresh, LeanPO, evaluation on `test`)."""
    model = world_model(str(Path(workdir).parent / ".cache" / "toy-world"))
    manifest = world_set(str(Path(workdir) / "synthetic"), max_train_questions, max_test_questions)
    result = pipeline(
        manifest=manifest, root=workdir, frames=FRAMES, sample=SampleConfig(model=model, **SAMPLE), reflect=REFLECT,
        pairs=PairsConfig(), train=TrainConfig(model=model, **LEANPO), evaluate=EvaluateConfig(**EVALUATE),
        rounds=1)
    return {**result, "sft_model": model, "manifest": manifest}


def accuracy_table(evaluation_uri: str, model: str, baseline: str) -> list[str]:
    """Console lines: answer accuracy before/after with intervals, overall and per type, and the paired change."""
    rows = io.read_table(evaluation_uri, schemas.EVALUATION).to_pylist()
    by = {(r["model"], r["metric"]): r for r in rows}
    answers = io.read_table(answers_uri(evaluation_uri), schemas.ANSWERS).to_pylist()
    mine = {a["id"]: a for a in answers if a["model"] == model}
    theirs = {a["id"]: a for a in answers if a["model"] == baseline}
    change = by.get((model, "answer_accuracy_change"))
    details = json.loads(change["details"]) if change else {}
    lines = [f"  {'':22s} {'SFT model (before)':30s} {'LeanPO (after)':30s} change (paired bootstrap)"]
    categories = ["all"] + sorted({a["category"] for a in answers})
    for category in categories:
        metric = "answer_accuracy" if category == "all" else f"answer_accuracy/{category}"
        label = "answer accuracy" if category == "all" else f"  {category}"
        if category == "all":
            delta = format_metric(change)
        else:
            ids = [i for i, a in mine.items() if a["category"] == category and i in theirs]
            paired = stats.paired_difference([theirs[i]["correct"] for i in ids], [mine[i]["correct"] for i in ids])
            delta = stats.format_interval(paired["delta"], paired["ci_low"], paired["ci_high"], points=True)
        before, after = format_metric(by.get((baseline, metric))), format_metric(by.get((model, metric)))
        lines.append(f"  {label:22s} {before:30s} {after:30s} {delta}")
    if change:
        lines.append(f"  questions right only after: {details['gained']}, only before: {details['lost']}; "
                     f"exact McNemar p = {details['p_value']:.3g}")
        verdict = ("the gain is significant: the 95% interval of the change lies above zero"
                   if change["ci_low"] > 0 else
                   "the model got worse: the 95% interval of the change lies below zero" if change["ci_high"] < 0
                   else "no significant change at this size: the 95% interval of the change includes zero")
        lines.append(f"  verdict: {verdict}")
    prior = {kind: str(value) for kind, value in synthetic.PRIOR.items()}
    lean = {who: sum(1 for a in rows_ if not a["correct"] and a["response"].strip() == prior.get(a["category"]))
            for who, rows_ in (("before", theirs.values()), ("after", mine.values()))}
    lines.append(f"  wrong answers that are the SFT data's majority answer (a language prior, not the video): "
                 f"{lean['before']} before, {lean['after']} after")
    return lines


def pair_lines(pairs_uri: str, videos_uri: str) -> list[str]:
    """How often each side of the pairs gives the true answer (all pairs, kept pairs) and why pairs were dropped."""
    truth = {r["id"]: r["answer"] for r in io.read_table(videos_uri, schemas.VIDEOS).to_pylist()}
    pairs = io.read_table(pairs_uri, schemas.PAIRS).to_pylist()
    kept = [p for p in pairs if p["kept"]]

    def right(side: str, rows: list[dict]) -> str:
        return f"{sum(answer_match(p[side], truth[p['id']]) for p in rows) / max(1, len(rows)):.2f}"

    reasons = collections.Counter(p["drop_reason"] for p in pairs if not p["kept"])
    lines = [f"  {len(kept)} kept of {len(pairs)}" + (" (dropped: " + ", ".join(
        f"{n} {reason}" for reason, n in reasons.most_common()) + ")" if reasons else "")]
    lines.append(f"  true answer in the winning reply (hint + self-reflection): {right('chosen', pairs)} of all pairs, "
                 f"{right('chosen', kept)} of kept; in the losing reply (lean 2-frame view, no hint): "
                 f"{right('rejected', pairs)} of all, {right('rejected', kept)} of kept")
    for p in kept[:3]:
        lines.append(f"  e.g. {truth[p['id']]!r:10s} Q: {p['prompt']!r}  chosen {p['chosen'].strip()!r}, "
                     f"rejected {p['rejected'].strip()!r}")
    return lines


def gate_lines(gated: dict | None, root: str) -> list[str]:
    """The evaluation gate's decision: promoted or not, why, and what the alias serves now."""
    if not gated:
        return ["evaluation gate: off (nothing registered)"]
    before = gated["current_before"]
    if gated["promote"]:
        head = (f"{gated['model_id']} PROMOTED to {gated['alias']} "
                f"({f'replacing {before}' if before else 'its first model'})")
    else:
        head = (f"{gated['model_id']} kept in the registry, NOT promoted: {gated['alias']} stays "
                f"{before or 'without a model (the SFT model stays in service)'}")
    return [f"evaluation gate: {head}", f"  why: {gated['reason']}",
            f"  lineage of every model trained here: .venv/bin/leanpo models list --root {root}"]


def run_demo(workdir: str = "runs/demo", max_train_questions: int = 0, max_test_questions: int = 0) -> dict:
    """Run the demo flow and print a summary (Prefect settings come from `flows.cli.prefect_environment`)."""
    root = str(Path(workdir).resolve())
    start = time.perf_counter()
    result = demo(root, max_train_questions, max_test_questions)
    done = result["rounds"][0]
    refresh, trained = done["refresh"], done["train"]
    print(f"\nleanpo demo finished in {time.perf_counter() - start:.0f} s  (run folder: {root})")
    print(f"SFT model (toy world): {result['sft_model']}")
    print("tables:")
    for name in ("videos", "frames", "samples", "scored", "pairs"):
        print(f"  {name:10s} {refresh[name]['rows']:5d} rows  {refresh[name]['uri']}")
    metrics, evaluation = trained["metrics"], trained["evaluation"]
    print(f"  {'metrics':10s} {metrics['rows']:5d} rows  {metrics['uri']}")
    print(f"  {'evaluation':10s} {evaluation['rows']:5d} rows  {evaluation['uri']}  (+ answers per question: "
          f"{answers_uri(evaluation['uri'])})")
    print("pairs (train split):")
    for line in pair_lines(refresh["pairs"]["uri"], refresh["videos"]["uri"]):
        print(line)
    steps = io.read_table(metrics["uri"], schemas.TRAIN_METRICS).to_pylist()
    gate = [s["label_smoothing/active_fraction"] for s in steps if s["label_smoothing/active_fraction"] is not None]
    print(f"training (LeanPO): {trained['steps']} steps, final loss {trained['final_loss']:.3f}, smoothing gate open "
          f"on {sum(gate) / max(1, len(gate)):.1%} of pairs on average -> {trained['published']['model']}")
    print(f"  likelihood curves (chosen/rejected mean log-prob per step, the paper's Figure-1 view): "
          f"{trained['plot']}")
    test = io.read_table(evaluation["uri"], schemas.EVALUATION).to_pylist()
    n = next((r["n"] for r in test if r["metric"] == "answer_accuracy"), 0)
    print(f"held-out answer accuracy on the 'test' split ({n} questions nothing was trained or tuned on), "
          "95% intervals:")
    for line in accuracy_table(evaluation["uri"], trained["model"], trained["base_model"]):
        print(line)
    blind = toyworld.blind_baselines(toyworld.WorldSettings(), "test")
    print(f"  video-blind baselines on the full test split: uniform guess {blind['uniform']:.3f}, most common "
          f"answer of the type {blind['type_prior']:.3f}, of the question {blind['question_prior']:.3f}")
    print(f"  report: {evaluation['report']}")
    for line in gate_lines(trained.get("gate"), root):
        print(line)
    print(f"inspect a table: .venv/bin/leanpo inspect {refresh['pairs']['uri']}")
    home = os.environ.get("PREFECT_HOME")
    prefix = "" if home == str(Path("runs/.prefect").resolve()) else f"PREFECT_HOME={home} "
    print(f"Prefect UI on this run: {prefix}.venv/bin/leanpo server, then open http://127.0.0.1:4200 "
          "(flow runs, task runs, artifacts: tables, reports, progress)")
    return result

