"""Load (soak): hundreds of synthetic videos, 10 % of them broken, on this machine's 2 cores.

- frames at full size: the frames stage over LEANPO_SOAK_VIDEOS (default 300) clips, every tenth one broken in one
  of ten ways (truncated, text, zeros, empty, random bytes, gzip, audio only, a folder, a dangling link, missing);
- the whole data-refresh flow (Prefect, vLLM sampling and scoring as child processes, pairs) over
  LEANPO_SOAK_REFRESH_VIDEOS (default: the same number) clips.

Both must complete with exactly one failure row per broken video, and record the peak resident memory of the process
tree (this process and every child: decode worker, Prefect server, vLLM engines) per stage and number of shards done
(the label names the last stage whose folder exists: "frames, 10 shard(s) done" covers the sampling engine's start);
the figures are printed and written to `soak-<test>.json` under LEANPO_SOAK_REPORT (default: the test's tmp folder).

Measured (2 shared CPU cores, load average 10-16 from other work, 300 videos, 30 broken): frames stage alone 6.5 s,
tree peak 0.31 GiB; the data-refresh flow 652 s (frames 6 s, sampling 5 min 16 s, scoring 4 min), 270 pairs, tree
peak 2.96 GiB during sampling (largest process: the sampling child with its vLLM engine, 1.97 GiB).

    .venv/bin/python -m pytest tests/reliability/test_soak.py -m soak -s -p no:cacheprovider
    LEANPO_SOAK_REFRESH_VIDEOS=60 .venv/bin/python -m pytest tests/reliability/test_soak.py -m soak -s -k refresh
"""

from __future__ import annotations

import gzip
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from leanpo_core import io, schemas, synthetic
from leanpo_core.config import FramesConfig, ReflectConfig, SampleConfig
from leanpo_core.frames import run_frames
from leanpo_core.layout import RunLayout
from leanpo_core.videos import read_videos, write_videos
from tests.reliability.corrupt import write_audio_only

pytestmark = pytest.mark.soak

VIDEOS = int(os.environ.get("LEANPO_SOAK_VIDEOS", "300"))
REFRESH_VIDEOS = int(os.environ.get("LEANPO_SOAK_REFRESH_VIDEOS", str(VIDEOS)))
FRAMES = FramesConfig(num_frames=8, max_side=128, timeout_s=60, shard_size=32)


def _break(path: Path, kind: int) -> None:
    """Replace a good clip by one of ten kinds of broken input (the manifest still names it)."""
    raw = path.read_bytes()
    path.unlink()
    if kind == 0:
        path.write_bytes(raw[:200])
    elif kind == 1:
        path.write_text("not a video\n")
    elif kind == 2:
        path.write_bytes(bytes(len(raw)))
    elif kind == 3:
        path.write_bytes(b"")
    elif kind == 4:
        path.write_bytes(np.random.default_rng(kind).integers(0, 256, len(raw), dtype=np.uint8).tobytes())
    elif kind == 5:
        path.write_bytes(gzip.compress(raw))
    elif kind == 6:
        write_audio_only(path, "wav", "pcm_s16le")
    elif kind == 7:
        path.mkdir()
    elif kind == 8:
        os.symlink(path.with_name("nowhere.mp4"), path)
    # kind 9: missing


def soak_set(folder: Path, num: int) -> tuple[list[dict], set[str]]:
    """`num` synthetic clips with one question each, every tenth clip broken: (videos rows, broken paths)."""
    manifest = synthetic.generate(folder, num=num, seed=7, questions_per_clip=1)
    rows = read_videos(str(manifest))
    broken = {row["video"] for row in rows[5::10]}
    for kind, video in enumerate(sorted(broken)):
        _break(Path(video), kind % 10)
    return rows, broken


class PeakMemory(threading.Thread):
    """Polls the resident memory of this process tree; keeps the peak per label (what `label()` says is running)."""

    def __init__(self, label, every_s: float = 0.2):
        super().__init__(daemon=True)
        self.label, self.every_s = label, every_s
        self.peaks: dict[str, dict] = {}
        self.stop = threading.Event()

    def sample(self) -> None:
        me = psutil.Process()
        total, biggest = 0, (0, "")
        for proc in [me, *me.children(recursive=True)]:
            try:
                rss, name = proc.memory_info().rss, " ".join(proc.cmdline()[1:4])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            biggest = max(biggest, (rss, name))
        label = self.label()
        peak = self.peaks.setdefault(label, {"tree_mib": 0.0, "largest_mib": 0.0, "largest": ""})
        if total / 2**20 > peak["tree_mib"]:
            peak["tree_mib"] = round(total / 2**20, 1)
        if biggest[0] / 2**20 > peak["largest_mib"]:
            peak.update(largest_mib=round(biggest[0] / 2**20, 1), largest=biggest[1])

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.sample()
            except OSError:
                pass  # a folder listed by label() vanished mid-poll

    def __enter__(self) -> PeakMemory:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join()


def _report(name: str, tmp_path: Path, figures: dict) -> None:
    folder = Path(os.environ.get("LEANPO_SOAK_REPORT", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"soak-{name}.json").write_text(json.dumps(figures, indent=2))
    print(f"\n{name}: {json.dumps(figures, indent=2)}")


def _done_shards(folder: str) -> int:
    return sum(Path(io.manifest_uri(uri)).exists() for uri in io.shard_uris(folder).values())


def test_frames_stage_at_full_size(tmp_path):
    rows, broken = soak_set(tmp_path / "syn", VIDEOS)
    layout = RunLayout(str(tmp_path / "run"))
    write_videos(rows, layout.videos)
    started = time.monotonic()
    with PeakMemory(lambda: f"frames, {_done_shards(layout.frames)} shard(s) done") as memory:
        result = run_frames(layout.videos, layout.frames, layout.failures("frames"), FRAMES, progress=False)
    wall = time.monotonic() - started
    failures = io.read_dataset(layout.failures("frames"), schemas.FAILURES).to_pylist()
    frames = io.read_dataset(layout.frames, schemas.FRAMES)
    assert (result.videos, result.failed, len(failures)) == (VIDEOS, len(broken), len(broken))
    assert {f["video"] for f in failures} == broken and frames.num_rows == VIDEOS - len(broken)
    _report("frames", tmp_path, {"videos": VIDEOS, "broken": len(broken), "wall_s": round(wall, 1),
                                 "shards": len(result.manifests), "peak_rss_per_shard": memory.peaks})


def test_data_refresh_flow(tmp_path):
    from flows.data_refresh import data_refresh
    from leanpo_core import toy

    rows, broken = soak_set(tmp_path / "syn", REFRESH_VIDEOS)
    manifest = tmp_path / "syn" / "manifest.jsonl"
    model = str(toy.build_toy_model("qwen2_vl", tmp_path / "model"))
    root = str(tmp_path / "run")
    layout = RunLayout(root)

    def stage() -> str:
        for name, folder in (("reflect", layout.scored), ("sample", layout.samples), ("frames", layout.frames)):
            if Path(folder).exists():  # a stage's folder appears with its first shard
                return f"{name}, {_done_shards(folder)} shard(s) done"
        return "ingest, model, frames shard 0"

    started = time.monotonic()
    with PeakMemory(stage) as memory:
        state = data_refresh(str(manifest), root, split="",
                             sample=SampleConfig(model=model, num_candidates=1, max_new_tokens=8, max_model_len=512,
                                                 max_num_seqs=16, shard_size=64),
                             frames=FRAMES, reflect=ReflectConfig(judge_max_tokens=4), return_state=True)
    wall = time.monotonic() - started
    assert state.is_completed(), state.message
    questions_on_broken = sum(r["video"] in broken for r in rows)
    frames_failures = io.read_dataset(layout.failures("frames"), schemas.FAILURES).to_pylist()
    sample_failures = io.read_dataset(layout.failures("sample"), schemas.FAILURES).to_pylist()
    pairs = io.read_table(layout.pairs, schemas.PAIRS)
    assert len(frames_failures) == len(broken) and {f["video"] for f in frames_failures} == broken
    assert len(sample_failures) == questions_on_broken  # no frames for them: one failure row per question
    assert pairs.num_rows == len(rows) - questions_on_broken
    _report("refresh", tmp_path, {"videos": REFRESH_VIDEOS, "broken": len(broken), "wall_s": round(wall, 1),
                                  "pairs": pairs.num_rows, "kept": sum(pairs.column("kept").to_pylist()),
                                  "peak_rss_per_shard": memory.peaks})
