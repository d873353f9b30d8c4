"""Processes killed mid-stage (slow: each starts real vLLM engines).

- the vLLM worker SIGKILLed while the sampling stage (`python -m leanpo_core.sample`, as the Prefect task runs it,
  through `leanpo_core.launch.run_module`) works on its second shard. On CPU, vLLM runs in the stage's own process
  (VLLM_ENABLE_V1_MULTIPROCESSING=0, see engine.py), so that process is the one killed; on GPU machines the engine
  core is a child process of it, which this test would find and kill too. The launcher reports a non-deterministic
  LaunchError (a retry may help) without hanging and leaves no process behind; the finished shard stays as it was;
  a rerun skips it, completes the table with one row per (question, side, candidate), and gives exactly the rows of
  a run without the kill.

    .venv/bin/python -m pytest tests/reliability/test_kills.py -m slow -p no:cacheprovider
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from leanpo_core import io, schemas, synthetic, toy
from leanpo_core.config import FramesConfig, SampleConfig
from leanpo_core.frames import run_frames
from leanpo_core.launch import LaunchError, run_module
from leanpo_core.layout import RunLayout
from leanpo_core.videos import read_videos, write_videos

pytestmark = pytest.mark.slow


def _vllm_processes(stage: psutil.Process) -> list[psutil.Process]:
    """The processes running vLLM for a sampling stage: its engine-core children if any (GPU), else itself (CPU)."""
    engines = [p for p in stage.children(recursive=True) if "EngineCore" in p.name()
               or any("EngineCore" in part for part in p.cmdline())]
    return engines or [stage]


def _rows(uri: str) -> list[tuple]:
    table = io.read_dataset(uri, schemas.SAMPLES).to_pylist()
    return sorted((r["id"], r["side"], r["candidate"], r["response"], r["seed"]) for r in table)


def test_vllm_engine_killed_mid_shard_then_rerun_completes(tmp_path):
    model = str(toy.build_toy_model("qwen2_vl", tmp_path / "model"))
    rows = read_videos(str(synthetic.generate(tmp_path / "syn", num=12, seed=5, questions_per_clip=1)))
    config_file = tmp_path / "sample.json"
    # Long enough shards (random weights reply until max_new_tokens) that the kill lands inside the second one.
    config_file.write_text(SampleConfig(model=model, num_candidates=2, max_new_tokens=48, max_model_len=512,
                                        max_num_seqs=4, shard_size=4, seed=3).model_dump_json())
    runs = {}
    for name in ("clean", "killed"):
        layout = RunLayout(str(tmp_path / name))
        write_videos(rows, layout.videos)
        run_frames(layout.videos, layout.frames, layout.failures("frames"), FramesConfig(num_frames=4, max_side=64),
                   progress=False)
        runs[name] = layout
    args = lambda layout: ["--config", str(config_file), "--root", layout.root, "--no-progress"]
    run_module("leanpo_core.sample", args(runs["clean"]), timeout_s=900)

    killed, layout = [], runs["killed"]
    first_shard = Path(io.shard_uri(layout.samples, 0) + io.MANIFEST_SUFFIX)

    stages = [p for p in psutil.Process().children(recursive=True)]  # not ours: anything running before

    def kill_vllm_after_first_shard() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not first_shard.exists():
            time.sleep(0.02)
        for proc in psutil.Process().children(recursive=True):
            try:
                if proc not in stages and "leanpo_core.sample" in proc.cmdline():
                    for target in _vllm_processes(proc):
                        target.send_signal(signal.SIGKILL)
                        killed.append(target.pid)
            except psutil.NoSuchProcess:
                pass

    killer = threading.Thread(target=kill_vllm_after_first_shard, daemon=True)
    killer.start()
    with pytest.raises(LaunchError) as raised:
        run_module("leanpo_core.sample", args(layout), timeout_s=600)
    killer.join()
    assert killed, "no vLLM process was found to kill"
    assert not raised.value.deterministic  # killed by a signal: Prefect's retry condition retries it
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in killed)
    first = io.read_manifest(io.shard_uri(layout.samples, 0))
    assert not Path(io.shard_uri(layout.samples, 2) + io.MANIFEST_SUFFIX).exists()  # it died before the end

    run_module("leanpo_core.sample", args(layout), timeout_s=900)
    assert io.read_manifest(io.shard_uri(layout.samples, 0)) == first  # kept, not redone
    resumed, clean = _rows(layout.samples), _rows(runs["clean"].samples)
    assert len(resumed) == len({r[:3] for r in resumed}) == 2 * 2 * len(rows)  # 2 sides x 2 candidates
    assert resumed == clean
