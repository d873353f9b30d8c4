"""The main job on the embedded default, through Prefect with a temporary local server.

Builds a tiny Qwen2-VL-shaped model offline and a synthetic video-QA set (real h264 clips of moving shapes with
exact answers), then runs the data refresh on its training split: frames -> prior-infused sampling with vLLM ->
self-reflection scoring -> ranked pairs. Prints where every table is and how to open the UI on the run.
Training and evaluation join the demo as they land.

    leanpo demo [--workdir runs/demo] [--videos 12]     # or: make demo
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task

from leanpo_core.config import FramesConfig, PairsConfig, ReflectConfig, SampleConfig
from flows.data_refresh import data_refresh


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
def demo(workdir: str, family: str = "qwen2_vl", videos: int = 12) -> dict:
    """Toy model + synthetic clips -> one data-refresh round (pairs ready for training)."""
    model = build_model(family, str(Path(workdir) / "model"))
    manifest = synthetic_set(str(Path(workdir) / "synthetic"), videos)
    return data_refresh(
        manifest=manifest, root=str(Path(workdir) / "round-0"),
        frames=FramesConfig(num_frames=8, max_side=128),
        sample=SampleConfig(model=model, num_candidates=2, max_new_tokens=24, max_model_len=1024, shard_size=8),
        reflect=ReflectConfig(judge_max_tokens=6),
        pairs=PairsConfig(),
    )


def run_demo(workdir: str = "runs/demo", family: str = "qwen2_vl", videos: int = 12) -> dict:
    """Run the demo flow and print a summary (Prefect settings come from `flows.cli.prefect_environment`)."""
    import os

    from leanpo_core import io, schemas

    root = str(Path(workdir).resolve())
    start = time.perf_counter()
    result = demo(root, family, videos)
    pairs = io.read_table(result["pairs"]["uri"], schemas.PAIRS).to_pylist()
    kept = sum(p["kept"] for p in pairs)
    reasons = sorted({p["drop_reason"] for p in pairs if not p["kept"]})
    print(f"\nleanpo demo finished in {time.perf_counter() - start:.0f} s  (run folder: {root})")
    for name in ("videos", "frames", "samples", "scored", "pairs"):
        print(f"  {name:8s} {result[name]['rows']:5d} rows  {result[name]['uri']}")
    print(f"  pairs: {kept} kept, {len(pairs) - kept} dropped" + (f" ({', '.join(reasons)})" if reasons else ""))
    print(f"  inspect: .venv/bin/leanpo inspect {result['pairs']['uri']}")
    print(f"  Prefect UI on this run: PREFECT_HOME={os.environ.get('PREFECT_HOME')} .venv/bin/prefect server start "
          "--host 127.0.0.1, then open http://127.0.0.1:4200")
    return result
