"""The main job on the embedded default, through Prefect with a temporary local server.

Builds a tiny Qwen2-VL-shaped model offline and a synthetic video-QA set (real h264 clips of moving shapes with
exact answers), warm-starts the model briefly with objective `sft` on the training split's ground-truth answers (so
that it is an "SFT model" at all, as the method assumes), then runs one round of the pipeline from it: data refresh
(frames -> prior-infused sampling with vLLM -> self-reflection scoring -> ranked pairs), LeanPO training, and
evaluation of the trained model against the warm-started one on the held-out split. Prints where every table is,
the before/after evaluation, and how to open the UI on the run.

    leanpo demo [--workdir runs/demo] [--videos 12] [--no-warm-start]     # or: make demo
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from prefect import flow, task

from flows.pipeline import pipeline
from leanpo_core.config import EvaluateConfig, FramesConfig, PairsConfig, ReflectConfig, SampleConfig, TrainConfig
from leanpo_core.layout import RunLayout
from tasks import data
from tasks import train as train_tasks

FRAMES = FramesConfig(num_frames=8, max_side=128)
# Short, fast runs of a tiny model: a high learning rate and no DeepSpeed or checkpointing on CPU.
WARM_START = dict(objective="sft", learning_rate=5e-3, warmup_ratio=0.0, epochs=3, per_device_batch_size=2,
                  deepspeed="none", gradient_checkpointing=False, save_steps=1000, seed=0, sft_weight=1.0)
LEANPO = dict(objective="leanpo", learning_rate=1e-3, warmup_ratio=0.0, epochs=4, per_device_batch_size=2,
              deepspeed="none", gradient_checkpointing=False, save_steps=1000, seed=0)


@task
def build_model(family: str, folder: str) -> str:
    """Build (once) the tiny offline model of `family`."""
    from leanpo_core import toy

    if not (Path(folder) / "toy.json").exists():
        toy.build_toy_model(family, folder)
    return folder


@task
def synthetic_set(folder: str, videos: int) -> str:
    """Write (once) the synthetic clips and their manifest."""
    from leanpo_core import synthetic

    manifest = Path(folder) / "manifest.jsonl"
    return str(manifest if manifest.exists() else synthetic.generate(folder, num=videos, seed=0,
                                                                     questions_per_clip=1))


@flow(name="leanpo-demo", log_prints=True)
def demo(workdir: str, family: str = "qwen2_vl", videos: int = 12, warm_start: bool = True) -> dict:
    """Toy model + synthetic clips -> SFT warm start -> one pipeline round (refresh, LeanPO, evaluation)."""
    model = build_model(family, str(Path(workdir) / "model"))
    manifest = synthetic_set(str(Path(workdir) / "synthetic"), videos)
    warm = None
    if warm_start:
        # The round's own ingest and frames: the data refresh below finds them cached.
        round0 = str(Path(workdir) / "round-0")
        train_videos = data.ingest(manifest, round0, "train")
        train_frames = data.frames(round0, FRAMES, train_videos)
        sft_root = str(Path(workdir) / "sft")
        gold = train_tasks.sft_pairs(RunLayout(sft_root).pairs, train_videos, train_frames)
        config = TrainConfig(model=model, **WARM_START)
        run_id = train_tasks.run_id_for(config, gold)
        warm = train_tasks.train(config, gold, train_frames, RunLayout(sft_root).train(run_id), run_id)
        model = warm["model"]
    result = pipeline(
        manifest=manifest, root=workdir, frames=FRAMES,
        sample=SampleConfig(model=model, num_candidates=2, max_new_tokens=24, max_model_len=1024, shard_size=8),
        reflect=ReflectConfig(judge_max_tokens=6),
        pairs=PairsConfig(),
        train=TrainConfig(model=model, **LEANPO),
        evaluate=EvaluateConfig(backend="transformers", split="test", max_new_tokens=8, max_model_len=1024),
        rounds=1,
    )
    return {**result, "warm_start": warm}


def _value(value: float, n: int) -> str:
    return "n/a" if n == 0 or math.isnan(value) else f"{value:.3f}"


def run_demo(workdir: str = "runs/demo", family: str = "qwen2_vl", videos: int = 12, warm_start: bool = True) -> dict:
    """Run the demo flow and print a summary (Prefect settings come from `flows.cli.prefect_environment`)."""
    from leanpo_core import io, schemas

    root = str(Path(workdir).resolve())
    start = time.perf_counter()
    result = demo(root, family, videos, warm_start)
    done = result["rounds"][0]
    refresh, trained = done["refresh"], done["train"]
    pairs = io.read_table(refresh["pairs"]["uri"], schemas.PAIRS).to_pylist()
    kept = sum(p["kept"] for p in pairs)
    reasons = sorted({p["drop_reason"] for p in pairs if not p["kept"]})
    print(f"\nleanpo demo finished in {time.perf_counter() - start:.0f} s  (run folder: {root})")
    print("tables:")
    for name in ("videos", "frames", "samples", "scored", "pairs"):
        print(f"  {name:10s} {refresh[name]['rows']:5d} rows  {refresh[name]['uri']}")
    metrics = trained["metrics"]
    print(f"  {'metrics':10s} {metrics['rows']:5d} rows  {metrics['uri']}")
    evaluation = trained["evaluation"]
    print(f"  {'evaluation':10s} {evaluation['rows']:5d} rows  {evaluation['uri']}")
    print(f"pairs: {kept} kept, {len(pairs) - kept} dropped" + (f" ({', '.join(reasons)})" if reasons else ""))
    if result["warm_start"]:
        warm = result["warm_start"]
        print(f"warm start (sft): {warm['steps']} steps, final loss {warm['final_loss']:.3f} -> {warm['model']}")
    print(f"training ({trained['objective']}): {trained['steps']} steps, final loss "
          f"{trained['final_loss']:.3f} -> {trained['published']['model']}; curve: {trained['plot']}")
    before, after = evaluation["baseline"], evaluation["model"]
    table = {(m["model"], m["metric"]): m for m in evaluation["metrics"]}
    print("evaluation on the held-out split 'test' (warm-started model -> LeanPO-trained model):")
    for metric in ("answer_accuracy", "answer_logp", "preference_accuracy", "preference_margin",
                   "answer_logp_change"):
        b, a = table.get((before, metric)), table.get((after, metric))
        if a is None:
            continue
        was = _value(b["value"], b["n"]) if b else "-"
        print(f"  {metric:22s} {was:>8s} -> {_value(a['value'], a['n']):>8s}   (n={a['n']})")
    print(f"  report: {evaluation['report']}")
    print(f"inspect a table: .venv/bin/leanpo inspect {refresh['pairs']['uri']}")
    home = os.environ.get("PREFECT_HOME")
    prefix = "" if home == str(Path("runs/.prefect").resolve()) else f"PREFECT_HOME={home} "
    print(f"Prefect UI on this run: {prefix}.venv/bin/leanpo server, then open http://127.0.0.1:4200 "
          "(flow runs, task runs, artifacts: tables, reports, progress)")
    return result
