"""The `leanpo` command line: the demo end to end through a real temporary Prefect server, and `inspect`."""

import os
from datetime import datetime, timezone
import subprocess
import sys
from pathlib import Path

import pytest

from leanpo_core import io, schemas

REPO = Path(__file__).resolve().parents[2]


def leanpo(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_demo_runs_the_data_refresh_through_prefect(tmp_path):
    """The README's first command end to end (less the set-up): toy model, synthetic clips, a data-refresh round."""
    workdir = tmp_path / "demo"
    env = {"PREFECT_HOME": str(workdir / ".prefect")}  # the CLI's default; the test session sets another
    proc = leanpo("demo", "--workdir", str(workdir), "--videos", "6", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    round0 = workdir / "round-0"
    videos = io.read_table(str(round0 / "videos.parquet"), schemas.VIDEOS)
    frames = io.read_dataset(str(round0 / "frames"), schemas.FRAMES)
    samples = io.read_dataset(str(round0 / "samples"), schemas.SAMPLES)
    scored = io.read_dataset(str(round0 / "scored"), schemas.SCORED)
    pairs = io.read_table(str(round0 / "pairs.parquet"), schemas.PAIRS)
    assert videos.num_rows > 0 and set(videos.column("split").to_pylist()) == {"train"}
    assert frames.num_rows == videos.num_rows  # one clip per question in the demo
    assert samples.num_rows == scored.num_rows == 4 * videos.num_rows  # 2 candidates x 2 sides
    assert pairs.num_rows == videos.num_rows
    for pair in pairs.to_pylist():  # every pair is kept, or dropped with a reason
        assert pair["kept"] or pair["drop_reason"]
    assert f"leanpo inspect {round0 / 'pairs.parquet'}" in proc.stdout
    assert (workdir / ".prefect" / "prefect.db").exists()  # kept for `prefect server start` to show the run


@pytest.mark.parametrize("where", ["local", "s3"])
def test_inspect_shows_kind_rows_and_first_rows(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_root")
    uri = io.join_uri(root, "failures.parquet")
    io.write_table([{"stage": "frames", "id": "q1", "video": "a.mp4", "error_type": "DecodeError",
                     "message": "cannot decode a.mp4", "traceback": None, "attempt": 1,
                     "created_at": datetime(2026, 1, 1, tzinfo=timezone.utc)}],
                   uri, schemas.FAILURES)
    proc = leanpo("inspect", uri, "--rows", "1")
    assert proc.returncode == 0, proc.stderr
    assert "failures v1" in proc.stdout and "1 rows" in proc.stdout and "cannot decode a.mp4" in proc.stdout


def test_inspect_missing_table_is_a_clear_error(tmp_path):
    proc = leanpo("inspect", str(tmp_path / "nope.parquet"))
    assert proc.returncode == 1 and "nothing stored at" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_the_commands():
    proc = leanpo("--help")
    assert proc.returncode == 0
    for command in ("demo", "inspect", "toy"):
        assert command in proc.stdout
