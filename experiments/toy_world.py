"""Does LeanPO make the toy world's SFT model better, and better than the controls? Every arm from one SFT model.

The toy world (`leanpo_core.toyworld`: an SFT model that reads the synthetic clips, and disjoint splits) with the
project's own stages, each run as `python -m leanpo_core.<stage>` in its own process group:
  1. setup     the shipped SFT model, the world's train / validation / test clips, one frames table for all three.
  2. pairs     sample -> reflect -> pairs from the SFT model with the demo's settings (K = 2 per side, hint +
               self-reflection vs the lean 2-frame view, ranked by token F1, trust filter on) over the train split
               (training pairs) and the validation split (held-out pairs for preference accuracy).
  3. arms      from the SFT model with one budget (epochs, batch, learning rate), for each seed:
                 sft-continued  objective `sft` on the train split's ground-truth answers, as many steps as LeanPO
                                takes: the control a sceptic asks for first;
                 dpo            frozen reference, beta 0.1;
                 simpo          eps 0, lambda_sft 0;
                 leanpo         the method's defaults (beta 2, gamma 0.5, eps 0.1, d 0, lambda_sft 0.5);
               and once (first seed) leanpo with the smoothing gate forced open (d = +inf).
  4. evaluate  every model on the test split (answers; nothing is tuned on it) and on the held-out validation pairs
               (preference accuracy); the SFT model once, alike.
  5. rounds    `--rounds` self-improvement rounds of the `pipeline` flow (Prefect, a temporary server), each sampling
               with the newest model, with the test accuracy after each round.
  6. report    experiments/results/toy_world.md, toy_world.json (per arm: answer_accuracy, n, ci_low, ci_high,
               seeds, delta_vs_sft, delta_ci_low, delta_ci_high, ...) and PNGs.
Every setting is fixed by the command line below and written into the report and the JSON (`plan`) before any
training starts; nothing is chosen on the test split.

    .venv/bin/python -m experiments.toy_world --out runs/toy_world              # ~16 min on 2 idle cores
    .venv/bin/python -m experiments.toy_world --out runs/tw-smoke --smoke        # every arm end to end, ~3 min

A rerun on the same --out reuses every finished phase (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import signal
import sys
import time
from pathlib import Path

import yaml

from experiments.dpo_vs_leanpo import Run, _stop, code_version, machine, plot_sides, versions
from leanpo_core import io, schemas, stats, toyworld
from leanpo_core.evaluate import answer_match, answers_uri
from leanpo_core.pairs import pair_row

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "toy_world"
DISCUSSION = "## Discussion"  # a hand-written section of the report, kept when the script rewrites the rest
ARMS = ("sft-continued", "dpo", "simpo", "leanpo")
GATE_ON = "leanpo-gate-on"
SPLITS = ("train", "validation", "test")


# How the default budget (--lr, --epochs) was chosen, before the final run: LeanPO from the SFT model on the train
# split's kept pairs, 3 seeds per setting, answer accuracy on the validation split's 200 questions (SFT model 0.660).
# Nothing was tuned on test. Change vs SFT (pp, seed-averaged) per setting:
BUDGET_SELECTION = {
    "split": "validation (200 questions; the SFT model 0.660)", "seeds": 3, "objective": "leanpo",
    "change_vs_sft_pp": {"lr 1e-3, 2 epochs": 0.5, "lr 1e-4, 2 epochs": 3.5, "lr 1e-4, 4 epochs": 3.0,
                         "lr 3e-4, 2 epochs": 3.3, "lr 3e-4, 4 epochs": 4.3, "lr 3e-4, 6 epochs": 4.7,
                         "lr 5e-4, 4 epochs": 5.3, "lr 5e-4, 6 epochs": 5.2, "lr 7e-4, 4 epochs": 5.2,
                         "lr 3e-4, 4 epochs, lambda_sft 1.0": 4.5,
                         "lr 3e-4, 4 epochs, milder lean view (4 frames, top-p 0.9)": 3.0,
                         "lr 5e-4, 4 epochs, K=4 candidates per side": 6.3},
    "chosen": "lr 5e-4, 4 epochs, K=4 candidates per side (+6.3 pp [+1.5, +11.2] on validation; K=2: +5.3)"}


def plan(args: argparse.Namespace) -> dict:
    """Every setting of the run, fixed before training (written into the report and the JSON)."""
    return {"seeds": list(range(args.seeds)), "epochs": args.epochs, "batch_size": args.batch_size,
            "learning_rate": args.lr, "candidates": args.candidates, "rounds": args.rounds, "backend": args.backend,
            "max_train_questions": args.max_train, "max_test_questions": args.max_test,
            "budget_selection": BUDGET_SELECTION, "world": toyworld.WorldSettings().__dict__, "objectives": {
                "sft-continued": {"objective": "sft", "sft_weight": 1.0, "data": "ground-truth answers, train split"},
                "dpo": {"objective": "dpo", "beta": 0.1}, "simpo": {"objective": "simpo"},
                "leanpo": {"objective": "leanpo"}, GATE_ON: {"objective": "leanpo", "smoothing_threshold": "inf"}}}


# ---------------------------------------------------------------- 1. setup


def setup(run: Run) -> None:
    from leanpo_core import videos

    model = toyworld.ensure_world(run.path("cache"))
    kept = videos.read_videos(str(world_manifest(run)))
    taken = collections.Counter(row["split"] for row in kept)
    videos.write_videos(kept, run.path("videos.parquet"))
    for split in SPLITS:
        videos.write_videos([r for r in kept if r["split"] == split], run.path("pairs", split, "videos.parquet"))
    (run.out / "sft-model.txt").write_text(str(model))
    print(f"SFT model {model}; questions: " + ", ".join(f"{k} {v}" for k, v in taken.items()))
    frames_config = run.write_yaml("frames.yaml", {"num_frames": toyworld.WorldSettings.frames, "max_side": 128})
    run.stage("leanpo_core.frames", "run", "--videos", run.path("videos.parquet"), "--frames", run.path("frames"),
              "--failures", run.path("failures", "frames"), "--config", frames_config, "--no-progress")


def world_manifest(run: Run) -> Path:
    """The world's train / validation / test manifest, capped by --max-train / --max-test."""
    manifest = toyworld.manifest(run.path("data"), only=SPLITS)
    if not run.args.max_train and not run.args.max_test:
        return manifest
    caps = {"train": run.args.max_train, "validation": run.args.max_train, "test": run.args.max_test}
    return toyworld.first_questions(manifest, caps, run.out / "data" / "manifest-capped.jsonl")


def sft_model(run: Run) -> str:
    return (run.out / "sft-model.txt").read_text().strip()


# ---------------------------------------------------------------- 2. pairs


def make_pairs(run: Run, split: str) -> None:
    sample = run.write_yaml("sample.yaml", {"model": sft_model(run), "num_candidates": run.args.candidates,
                                            "max_new_tokens": 8, "max_model_len": 1024, "shard_size": 256,
                                            "seed": 0, "backend": run.args.backend})
    reflect = run.write_yaml("reflect.yaml", {"judge": False, "prior_f1_weight": 1.0, "batch_size": 16,
                                              "backend": run.args.backend})
    pairs = run.write_yaml("pairs.yaml", {"trust_filter": True})
    tables = ["--root", run.path("pairs", split), "--frames", run.path("frames")]
    run.stage("leanpo_core.sample", "--config", sample, *tables, "--no-progress")
    run.stage("leanpo_core.reflect", "--config", reflect, "--model", sft_model(run), *tables)
    run.stage("leanpo_core.pairs", "--config", pairs, *tables)


def pair_stats(run: Run, split: str) -> dict:
    """Kept/dropped counts with reasons, and how often each side gives the true answer."""
    truth = {r["id"]: r["answer"] for r in io.read_table(run.path("pairs", split, "videos.parquet"),
                                                         schemas.VIDEOS).to_pylist()}
    table = io.read_table(run.path("pairs", split, "pairs.parquet"), schemas.PAIRS).to_pylist()
    kept = [p for p in table if p["kept"]]

    def share(side: str, rows: list[dict]) -> float:
        return sum(answer_match(p[side], truth[p["id"]]) for p in rows) / max(1, len(rows))

    return {"pairs": len(table), "kept": len(kept),
            "dropped": dict(collections.Counter(p["drop_reason"] for p in table if not p["kept"])),
            "chosen_true_all": share("chosen", table), "rejected_true_all": share("rejected", table),
            "chosen_true_kept": share("chosen", kept), "rejected_true_kept": share("rejected", kept)}


def gold_pairs(run: Run) -> str:
    """The control's data: every train question with its ground-truth answer as the chosen reply (pairs schema)."""
    generated = {p["id"]: p for p in io.read_table(run.path("pairs", "train", "pairs.parquet"),
                                                   schemas.PAIRS).to_pylist()}
    rows = []
    for q in io.read_table(run.path("pairs", "train", "videos.parquet"), schemas.VIDEOS).to_pylist():
        if q["id"] not in generated:
            continue
        template = generated[q["id"]]  # its video, frames and indices
        frame = {"video_key": template["video_key"], "shard_uri": template["frames_uri"],
                 "frame_indices": template["chosen_frame_indices"]}
        answer = " " + q["answer"].strip()  # as a reply continues the assistant prefix
        rows.append(pair_row(f"{q['id']}:gold", q["id"], template["prompt"], template["video"], frame, answer, answer,
                             round_=template["round"], config_hash="gold"))
    uri = run.path("pairs", "train", "gold.parquet")
    io.write_table(rows, uri, schemas.PAIRS)
    return uri


# ---------------------------------------------------------------- 3. arms


def leanpo_steps(run: Run) -> int:
    kept = pair_stats(run, "train")["kept"]
    return math.ceil(kept / run.args.batch_size) * math.ceil(run.args.epochs)


def train_config(run: Run, arm: str, seed: int) -> dict:
    config = {"model": sft_model(run), "learning_rate": run.args.lr, "epochs": run.args.epochs,
              "per_device_batch_size": run.args.batch_size, "warmup_ratio": 0.1, "lr_scheduler": "linear",
              "freeze_vision": True, "deepspeed": "none", "gradient_checkpointing": False, "precision": "fp32",
              "seed": seed, "max_length": 512, "save_steps": 100000}
    if arm == "sft-continued":
        config.update(objective="sft", sft_weight=1.0, max_steps=leanpo_steps(run), epochs=1000)
    elif arm == GATE_ON:
        config.update(objective="leanpo", smoothing_threshold=math.inf)
    else:
        config.update(objective=arm)
    return config


def arm_dir(run: Run, arm: str, seed: int) -> Path:
    return run.out / "arms" / f"{arm}-seed{seed}"


def train(run: Run, arm: str, seed: int) -> None:
    config = run.write_yaml(f"{arm}-seed{seed}.yaml", train_config(run, arm, seed))
    pairs = gold_pairs(run) if arm == "sft-continued" else run.path("pairs", "train", "pairs.parquet")
    run.stage("leanpo_core.train", "--config", config, "--pairs", pairs, "--frames", run.path("frames"),
              "--out", str(arm_dir(run, arm, seed)), "--run-id", f"{arm}-seed{seed}")


def evaluation_uri(run: Run, name: str) -> str:
    return run.path("evaluation", f"{name}.parquet")


def evaluate(run: Run, model: str, name: str) -> None:
    config = run.write_yaml("evaluate.yaml", {"split": "test", "max_new_tokens": 8, "max_model_len": 1024,
                                              "batch_size": 16, "seed": 0, "backend": run.args.backend})
    run.stage("leanpo_core.evaluate", "--model", model, "--videos", run.path("pairs", "test", "videos.parquet"),
              "--frames", run.path("frames"), "--pairs", run.path("pairs", "validation", "pairs.parquet"),
              "--out", evaluation_uri(run, name), "--config", config, "--run-id", name)


# ---------------------------------------------------------------- 5. rounds


def rounds(run: Run) -> None:
    """The pipeline flow through Prefect (a temporary server under --out) for --rounds rounds; its evaluation gate
    decides each round's model, and every later round starts from the promoted one."""
    from leanpo_core import launch

    config = {"manifest": str(world_manifest(run)), "root": run.path("rounds"), "rounds": run.args.rounds,
              "frames": {"num_frames": toyworld.WorldSettings.frames, "max_side": 128},
              "sample": {"model": sft_model(run), "num_candidates": run.args.candidates, "max_new_tokens": 8,
                         "max_model_len": 1024, "shard_size": 256},
              "reflect": {"judge": False, "prior_f1_weight": 1.0, "batch_size": 16},
              "train": {"model": sft_model(run), "objective": "leanpo", "learning_rate": run.args.lr,
                        "epochs": run.args.epochs, "per_device_batch_size": run.args.batch_size,
                        "warmup_ratio": 0.1, "deepspeed": "none", "gradient_checkpointing": False,
                        "save_steps": 100000, "seed": 0},
              "evaluate": {"split": "test", "max_new_tokens": 8, "max_model_len": 1024, "batch_size": 16}}
    path = run.write_yaml("pipeline.yaml", config)
    start = time.perf_counter()
    launch.run_module("flows.cli", ["run", "pipeline", "--config", path],
                      env={"PREFECT_HOME": run.path(".prefect"), "VLLM_CPU_KVCACHE_SPACE": "1"},
                      log=lambda line: print("    " + line, flush=True) if "| INFO" not in line else None)
    print(f"  (pipeline, {run.args.rounds} rounds, took {time.perf_counter() - start:.0f} s)")


def _relative(path: str) -> str:
    """A path inside the repository as a repository-relative one (results name no machine's folders)."""
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return path


def _gate_verdicts(run: Run) -> dict[str, str]:
    """{model id: "promoted" | "rejected: <reason>" | "registered"} from the rounds' registry (the gate's record)."""
    from leanpo_core.layout import RunLayout
    from leanpo_core.registry import Registry

    registry = RunLayout(run.path("rounds")).registry
    if not io.exists(registry):
        return {}
    state = Registry(registry).state()
    promoted = {e["model_id"] for e in state.events if e["event"] == "promoted"}
    return {model_id: "promoted" if model_id in promoted else f"rejected: {model['rejected']['reason']}"
            if model["rejected"] else "registered" for model_id, model in state.models.items()}


def round_results(run: Run) -> list[dict]:
    out, verdicts = [], _gate_verdicts(run)
    for index in range(run.args.rounds):
        records = sorted((run.out / "rounds" / f"round-{index}" / "train").glob("*/published.json"))
        if not records:
            break
        published = json.loads(records[-1].read_text())
        rows = io.read_table(published["evaluation"], schemas.EVALUATION).to_pylist()
        get = {(r["model"], r["metric"]): r for r in rows}
        before, after = get[(published["base_model"], "answer_accuracy")], get[(published["local_model"],
                                                                               "answer_accuracy")]
        change = get.get((published["local_model"], "answer_accuracy_change"))
        out.append({"round": index, "generator": _relative(published["base_model"]), "before": before["value"],
                    "after": after["value"], "n": after["n"], "ci_low": after["ci_low"], "ci_high": after["ci_high"],
                    "delta": change["value"] if change else math.nan,
                    "delta_ci_low": change["ci_low"] if change else math.nan,
                    "delta_ci_high": change["ci_high"] if change else math.nan,
                    "gate": verdicts.get(published["run_id"], "not gated")})
    return out


# ---------------------------------------------------------------- 6. results and report


def answers(run: Run, name: str) -> dict[str, dict]:
    """{question id: answer row} of one evaluated model."""
    uri = answers_uri(evaluation_uri(run, name))
    return {a["id"]: a for a in io.read_table(uri, schemas.ANSWERS).to_pylist()}


def metric(run: Run, name: str, wanted: str) -> tuple[float, int]:
    for row in io.read_table(evaluation_uri(run, name), schemas.EVALUATION).to_pylist():
        if row["metric"] == wanted:
            return row["value"], row["n"]
    return math.nan, 0


def arm_result(run: Run, names: list[str], sft: dict[str, dict]) -> dict:
    """Accuracy averaged over the seeds' models, with intervals over the questions, and the paired change vs SFT."""
    per_seed = [answers(run, name) for name in names]
    ids = sorted(sft)
    score = [sum(seed[i]["correct"] for seed in per_seed) / len(per_seed) for i in ids]
    low, high = stats.bootstrap_interval(score)
    change = stats.paired_difference([float(sft[i]["correct"]) for i in ids], score)
    by_type: dict[str, list[float]] = collections.defaultdict(list)
    for i, value in zip(ids, score):
        by_type[sft[i]["category"]].append(value)
    types = {}
    for kind, values in sorted(by_type.items()):
        t_low, t_high = stats.bootstrap_interval(values)
        types[kind] = {"answer_accuracy": sum(values) / len(values), "n": len(values), "ci_low": t_low,
                       "ci_high": t_high}
    preference = [metric(run, name, "preference_accuracy") for name in names]
    logp_change = [metric(run, name, "answer_logp")[0] for name in names]
    return {"answer_accuracy": sum(score) / len(score), "n": len(score), "ci_low": low, "ci_high": high,
            "seeds": len(names), "seed_accuracies": [sum(s[i]["correct"] for i in ids) / len(ids) for s in per_seed],
            "delta_vs_sft": change["delta"], "delta_ci_low": change["ci_low"], "delta_ci_high": change["ci_high"],
            "delta_p_value": change["p_value"], "per_type": types,
            "preference_accuracy": sum(v for v, _ in preference) / len(preference),
            "preference_n": preference[0][1], "answer_logp": sum(logp_change) / len(logp_change)}


def train_curves(run: Run, arm: str, seed: int) -> list[dict]:
    return io.read_table(str(arm_dir(run, arm, seed) / "metrics.parquet"), schemas.TRAIN_METRICS).to_pylist()


def plot(run: Run, results: Path) -> list[str]:
    """The paper's Figure-1 view: chosen/rejected mean log-likelihood change vs the SFT model over training (first
    seed) for DPO and LeanPO; and held-out accuracy per arm with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{NAME}_displacement.png", f"{NAME}_accuracy.png"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, arm in zip(axes, ("dpo", "leanpo")):
        plot_sides(ax, train_curves(run, arm, 0), "displacement", zero_line=True)
        ax.set_title(f"{arm}: mean token log-likelihood minus the SFT model's", fontsize=9)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("nats per token")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results / names[0], dpi=90)
    plt.close(fig)
    data = json.loads((results / f"{NAME}.json").read_text())["arms"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [arm for arm in ("sft", *ARMS, GATE_ON) if arm in data]
    values = [data[a]["answer_accuracy"] for a in labels]
    errors = [[v - data[a]["ci_low"] for a, v in zip(labels, values)],
              [data[a]["ci_high"] - v for a, v in zip(labels, values)]]
    ax.bar(labels, values, yerr=errors, capsize=4, color=["grey" if a == "sft" else "tab:blue" for a in labels])
    ax.set_ylabel("held-out answer accuracy (95% CI)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(results / names[1], dpi=90)
    plt.close(fig)
    return names


def results(run: Run, command: str) -> dict:
    sft = answers(run, "sft")
    seeds = range(run.args.seeds)
    arms = {"sft": arm_result(run, ["sft"], sft)}
    for arm in ARMS:
        arms[arm] = arm_result(run, [f"{arm}-seed{s}" for s in seeds], sft)
    arms[GATE_ON] = arm_result(run, [f"{GATE_ON}-seed0"], sft)
    gates = {}
    for arm in ("leanpo", GATE_ON):
        rows = train_curves(run, arm, 0)
        values = [r["label_smoothing/active_fraction"] for r in rows
                  if r["label_smoothing/active_fraction"] is not None]
        gates[arm] = sum(values) / max(1, len(values))
    likelihood = {}
    for arm in ("dpo", "leanpo", "simpo"):
        rows = train_curves(run, arm, 0)
        tail = rows[-max(1, len(rows) // 10):]
        likelihood[arm] = {}
        for side in ("chosen", "rejected"):
            values = [r[f"displacement/{side}"] for r in tail if r[f"displacement/{side}"] is not None]
            likelihood[arm][side] = sum(values) / len(values) if values else math.nan
    blind = toyworld.blind_baselines(toyworld.WorldSettings(), "test")
    return {"plan": plan(run.args), "command": command, "code": (run.out / "code.txt").read_text(),
            "machine": machine(), "versions": versions(),
            "phases": run.timings, "pairs": {s: pair_stats(run, s) for s in ("train", "validation")},
            "arms": arms, "smoothing_gate_active_fraction": gates, "final_displacement": likelihood,
            "rounds": round_results(run), "blind_baselines_test": blind}


def fmt(arm: dict) -> str:
    return stats.format_interval(arm["answer_accuracy"], arm["ci_low"], arm["ci_high"], arm["n"])


def report(data: dict, pngs: list[str]) -> str:
    arms = data["arms"]
    seconds = sum(p["seconds"] for p in data["phases"].values())
    lines = ["# Toy world: does a LeanPO round beat the SFT model and the controls?", "",
             f"Command: `{data['command']}`  ", f"Code: {data['code']} (when its first phase started)  ",
             f"Machine: {data['machine']}; {data['versions']}  ", f"Wall time of the phases: {seconds / 60:.1f} min", "",
             "## Plan (fixed before training; nothing chosen on the test split)", "", "```yaml",
             yaml.safe_dump(data["plan"], sort_keys=True).strip(), "```", "",
             "## Held-out answer accuracy (test split)", "",
             "Accuracy averaged over the seeds' models; intervals are 95% percentile bootstraps over the questions; "
             "the change is paired with the SFT model on the same questions.", "",
             "| arm | seeds | accuracy [95% CI] | change vs SFT [95% CI] | McNemar p (seed majority) | per seed | "
             "preference acc. (validation pairs) |", "|---|---|---|---|---|---|---|"]
    for name, arm in arms.items():
        change = "" if name == "sft" else stats.format_interval(arm["delta_vs_sft"], arm["delta_ci_low"],
                                                                 arm["delta_ci_high"], points=True)
        p = "" if name == "sft" else f"{arm['delta_p_value']:.3g}"
        lines.append(f"| {name} | {arm['seeds']} | {fmt(arm)} | {change} | {p} | "
                     f"{', '.join(f'{v:.3f}' for v in arm['seed_accuracies'])} | "
                     f"{arm['preference_accuracy']:.3f} (n={arm['preference_n']}) |")
    kinds = sorted(arms["sft"]["per_type"])
    lines += ["", "Per question type:", "", "| arm | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, arm in arms.items():
        lines.append(f"| {name} | " + " | ".join(
            stats.format_interval(arm["per_type"][k]["answer_accuracy"], arm["per_type"][k]["ci_low"],
                                  arm["per_type"][k]["ci_high"], arm["per_type"][k]["n"]) for k in kinds) + " |")
    blind = data["blind_baselines_test"]
    lines += ["", f"Video-blind baselines on the test split: uniform guess {blind['uniform']:.3f}, most common "
              f"answer of the type in the sft split {blind['type_prior']:.3f}, of the question "
              f"{blind['question_prior']:.3f}.", "", "## Pairs", "", "| split | pairs | kept | dropped | "
              "winning reply right (all / kept) | losing reply right (all / kept) |", "|---|---|---|---|---|---|"]
    for split, p in data["pairs"].items():
        lines.append(f"| {split} | {p['pairs']} | {p['kept']} | {p['dropped']} | {p['chosen_true_all']:.2f} / "
                     f"{p['chosen_true_kept']:.2f} | {p['rejected_true_all']:.2f} / {p['rejected_true_kept']:.2f} |")
    gates, shift = data["smoothing_gate_active_fraction"], data["final_displacement"]
    lines += ["", "## Likelihoods and the smoothing gate", "",
              f"![chosen/rejected likelihood change vs SFT]({pngs[0]})", "",
              "Mean token log-likelihood minus the SFT model's, over the last tenth of training (first seed):", "",
              "| arm | chosen | rejected |", "|---|---|---|"]
    lines += [f"| {arm} | {v['chosen']:+.3f} | {v['rejected']:+.3f} |" for arm, v in shift.items()]
    lines += ["", f"Smoothing gate open on {gates['leanpo']:.1%} of pairs on average with the default d = 0, and on "
              f"{gates[GATE_ON]:.1%} with d = +inf (forced on); accuracy {fmt(arms['leanpo'])} vs "
              f"{fmt(arms[GATE_ON])} (one seed for the forced gate).", "", f"![accuracy per arm]({pngs[1]})", ""]
    if data["rounds"]:
        lines += ["## Self-improvement rounds (the pipeline flow)", "",
                  "Each round after the first starts from the gate's current (promoted) model.", "",
                  "| round | accuracy before | after [95% CI] | change [95% CI] | gate |", "|---|---|---|---|---|"]
        for r in data["rounds"]:
            lines.append(f"| {r['round']} | {r['before']:.3f} | "
                         f"{stats.format_interval(r['after'], r['ci_low'], r['ci_high'], r['n'])} | "
                         f"{stats.format_interval(r['delta'], r['delta_ci_low'], r['delta_ci_high'], points=True)} | "
                         f"{r.get('gate', '')} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.toy_world", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/toy_world", help="folder for every table and model (default "
                        "runs/toy_world; finished phases are reused on a rerun)")
    parser.add_argument("--results", default=str(RESULTS), help="where the report, JSON and PNGs go")
    parser.add_argument("--smoke", action="store_true", help="every arm end to end on a few questions: 1 seed, "
                        "no rounds, the transformers backend (no vLLM start-up); results under --out/results")
    parser.add_argument("--backend", choices=["auto", "vllm", "transformers"], default="auto",
                        help="generation engine of sampling and evaluation (default auto: vLLM)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per arm (default 3)")
    parser.add_argument("--epochs", type=float, default=4, help="epochs over the kept pairs (default 4, chosen on the "
                        "validation split: see BUDGET_SELECTION)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimiser step (default 8)")
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate of every arm (default 5e-4, chosen on "
                        "the validation split: see BUDGET_SELECTION)")
    parser.add_argument("--candidates", type=int, default=4, help="K candidates per side (default 4, chosen on the "
                        "validation split: see BUDGET_SELECTION)")
    parser.add_argument("--rounds", type=int, default=2, help="self-improvement rounds of the pipeline flow "
                        "(default 2; 0: none)")
    parser.add_argument("--max-train", type=int, default=0, help="cap on train (and validation) questions")
    parser.add_argument("--max-test", type=int, default=0, help="cap on test questions")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.rounds, args.backend = 1, 0, "transformers"
        args.max_train, args.max_test = args.max_train or 16, args.max_test or 12
        args.results = str(Path(args.out) / "results")
    return args


def main(argv: list[str] | None = None) -> dict:
    signal.signal(signal.SIGTERM, _stop)
    args = parse_args(argv)
    run = Run(args)
    run.out.mkdir(parents=True, exist_ok=True)
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python -m experiments.toy_world", *(sys.argv[1:] if argv is None else argv)])
    (run.out / "plan.json").write_text(json.dumps(plan(args), indent=2, sort_keys=True))
    if not (run.out / "code.txt").exists():  # the code the first phase ran from; a resumed run keeps it
        (run.out / "code.txt").write_text(code_version())
    done = lambda *parts: run.out.joinpath(*parts).exists()  # noqa: E731
    run.phase("setup", done("frames") and done("sft-model.txt"), lambda: setup(run))
    for split in ("train", "validation"):
        run.phase(f"pairs {split}", done("pairs", split, "pairs.parquet"), lambda s=split: make_pairs(run, s))
    run.phase("evaluate sft", done("evaluation", "sft.parquet"), lambda: evaluate(run, sft_model(run), "sft"))
    jobs = [(arm, seed) for seed in range(args.seeds) for arm in ARMS] + [(GATE_ON, 0)]
    for arm, seed in jobs:
        name = f"{arm}-seed{seed}"
        run.phase(f"train {name}", done("arms", name, "model", "config.json"), lambda a=arm, s=seed: train(run, a, s))
        run.phase(f"evaluate {name}", done("evaluation", f"{name}.parquet"),
                  lambda a=arm, s=seed, n=name: evaluate(run, str(arm_dir(run, a, s) / "model"), n))
    if args.rounds:
        run.phase("rounds", done("rounds", f"round-{args.rounds - 1}", "train"), lambda: rounds(run))
    data = results(run, command)
    (results_dir / f"{NAME}.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    text = report(data, plot(run, results_dir))
    previous = results_dir / f"{NAME}.md"
    if previous.exists() and DISCUSSION in previous.read_text():
        text = text.rstrip("\n") + "\n\n" + DISCUSSION + previous.read_text().split(DISCUSSION, 1)[1]
    previous.write_text(text)
    print("\n" + text + f"\n\nreport: {results_dir / (NAME + '.md')}")
    return data


if __name__ == "__main__":
    main()
