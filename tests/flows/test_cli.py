"""The `leanpo` command line: the demo end to end through a real temporary Prefect server, `run` with a bad config,
`server` on localhost, and `inspect`."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from leanpo_core import evaluate, io, schemas, toyworld

REPO = Path(__file__).resolve().parents[2]


def leanpo(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_demo_runs_the_pipeline_through_prefect(tmp_path):
    """The README's first command end to end (less the set-up), on a slice of the toy world: its SFT model, a data
    refresh over the train split's first questions, LeanPO training, and the before/after evaluation on the test
    split with intervals and a row per question type, and the summary that says where it all is."""
    workdir = tmp_path / "demo"
    env = {"PREFECT_HOME": str(workdir / ".prefect")}  # the test session sets another
    proc = leanpo("demo", "--workdir", str(workdir), "--max-train-questions", "12", "--max-test-questions", "16",
                  env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    round0 = workdir / "round-0"
    videos = io.read_table(str(round0 / "videos.parquet"), schemas.VIDEOS)
    frames = io.read_dataset(str(round0 / "frames"), schemas.FRAMES)
    samples = io.read_dataset(str(round0 / "samples"), schemas.SAMPLES)
    scored = io.read_dataset(str(round0 / "scored"), schemas.SCORED)
    pairs = io.read_table(str(round0 / "pairs.parquet"), schemas.PAIRS)
    assert videos.num_rows == 12 and set(videos.column("split").to_pylist()) == {"train"}
    assert frames.num_rows == len(set(videos.column("video").to_pylist()))  # one decode per clip
    assert samples.num_rows == scored.num_rows == 8 * videos.num_rows  # 4 candidates x 2 sides
    assert pairs.num_rows == videos.num_rows
    for pair in pairs.to_pylist():  # every pair is kept, or dropped with a reason
        assert pair["kept"] or pair["drop_reason"]
    [record] = (round0 / "train").glob("*/published.json")
    published = json.loads(record.read_text())
    assert published["objective"] == "leanpo" and published["steps"] > 0
    assert (Path(published["model"]) / "config.json").exists() and Path(published["plot"]).exists()
    assert published["base_model"] == str(toyworld.ASSET)  # trained from the toy world's SFT model
    evaluation = io.read_table(published["evaluation"], schemas.EVALUATION).to_pylist()
    assert {r["model"] for r in evaluation} == {published["local_model"], published["base_model"]}
    accuracy = [r for r in evaluation if r["metric"] == "answer_accuracy"]
    assert len(accuracy) == 2 and all(r["n"] == 16 and r["ci_low"] <= r["value"] <= r["ci_high"] for r in accuracy)
    answers = io.read_table(evaluate.answers_uri(published["evaluation"]), schemas.ANSWERS).to_pylist()
    assert len(answers) == 2 * 16 and all(a["split"] == "test" for a in answers)
    out = proc.stdout
    assert f"leanpo inspect {round0 / 'pairs.parquet'}" in out and "leanpo server" in out
    assert "SFT model (before)" in out and "LeanPO (after)" in out and "answer accuracy" in out
    kinds = {a["category"] for a in answers}
    assert all(f"    {kind}" in out for kind in kinds) and "verdict:" in out and "video-blind baselines" in out
    assert "true answer in the winning reply" in out and "smoothing gate open on" in out
    assert (workdir / ".prefect" / "prefect.db").exists()  # kept for `leanpo server` to show the run
    # A console for people: a line per stage with its rows and time; the stage processes' own lines (vLLM, the
    # trainer) only in the log file, and third-party progress bars nowhere.
    console, log = proc.stdout + proc.stderr, (workdir / "leanpo.log").read_text()
    for table, rows in (("samples", samples.num_rows), ("scored", scored.num_rows), ("pairs", pairs.num_rows)):
        assert f"{table}: {rows} rows in " in console and f"{table}: {rows} rows in " in log
    assert f"full log in {workdir / 'leanpo.log'}" in console
    trained = re.compile(r"trained \d+ step\(s\), final loss")  # the training process's own summary line
    assert trained.search(log) and not trained.search(console)
    assert "Loading weights" not in console + log and "Writing model shards" not in console + log
    # The clips' vision features, stored by the reflect pass beside the frames table, serve training (no tower run)
    # and the second evaluated model.
    assert re.search(r"train: vision features: 0 video\(s\) through the tower, \d+ reuse\(s\) in memory, "
                     r"[1-9]\d* read from and 0 written to " + re.escape(str(round0 / "vision_features")), log), log
    assert re.search(r"evaluate: .*: vision features: 0 video\(s\) through the tower.* [1-9]\d* read from", log), log
    assert len(console.splitlines()) < 120, console


def test_run_rejects_a_bad_config_naming_the_field(tmp_path):
    """A config that fails validation stops `leanpo run` before any work, with the field's name and no traceback."""
    config = tmp_path / "train.yaml"
    config.write_text(f"root: {tmp_path / 'run'}\ntrain:\n  model: /models/sft\n  learning_rate: -1\n")
    proc = leanpo("run", "train", "--config", str(config), env={"PREFECT_HOME": str(tmp_path / ".prefect")})
    assert proc.returncode == 2, proc.stderr
    assert "train.learning_rate" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
    config.write_text("[not, a, mapping]\n")
    proc = leanpo("run", "train", "--config", str(config), env={"PREFECT_HOME": str(tmp_path / ".prefect")})
    assert proc.returncode == 2 and "must hold a mapping" in proc.stderr


def test_server_serves_the_ui_on_localhost(tmp_path):
    """`leanpo server` starts Prefect's server and UI on 127.0.0.1 with the given PREFECT_HOME's database."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = tmp_path / ".prefect"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "server", "--port", str(port)], cwd=REPO,
                            env={**os.environ, "PREFECT_HOME": str(home)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        health = None
        for _ in range(240):  # a fresh database takes 10-20 s: wait for it (up to two minutes)
            try:
                health = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.5)
        assert health == b"true", proc.stdout.read() if proc.poll() is not None else "server did not answer"
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
        assert "<html" in page.lower()
        assert (home / "prefect.db").exists()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_without_a_server_stops_on_ctrl_c(tmp_path):
    """`leanpo serve` with no server to use starts one (UI included) in a session of its own, serves the
    deployments there, and a Ctrl-C from the terminal (SIGINT to the command's process group) stops it within
    seconds, server included, without a traceback. With Prefect's temporary server in the same group, the server
    died first and `serve` retried pausing its deployments against it forever."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / ".prefect")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:  # until the deployments are served
            lines.append(line)
            if "being served" in line:
                break
        out = "".join(lines)
        [url] = re.findall(r"Prefect UI at (http://127\.0\.0\.1:\d+)", out)
        request = urllib.request.Request(f"{url}/api/deployments/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        served = json.loads(urllib.request.urlopen(request, timeout=10).read())
        assert len(served) == 5, served
        assert "<html" in urllib.request.urlopen(f"{url}/", timeout=10).read().decode().lower()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out + rest
    assert "Traceback" not in rest, rest
    with pytest.raises(OSError):  # its server is gone too
        urllib.request.urlopen(f"{url}/api/health", timeout=2)


def _failure(video: str) -> dict:
    return {"stage": "frames", "id": "q1", "video": video, "error_type": "DecodeError",
            "message": f"cannot decode {video}", "traceback": None, "attempt": 1,
            "created_at": datetime(2026, 1, 1, tzinfo=timezone.utc)}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_inspect_shows_kind_rows_and_first_rows(where, tmp_path, request):
    """One table, and the folder of a sharded one (its shards in shard order, as the stages write them)."""
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_root")
    uri = io.join_uri(root, "failures.parquet")
    io.write_table([_failure("a.mp4")], uri, schemas.FAILURES)
    proc = leanpo("inspect", uri, "--rows", "1")
    assert proc.returncode == 0, proc.stderr
    assert "failures v1" in proc.stdout and "1 rows" in proc.stdout and "cannot decode a.mp4" in proc.stdout
    folder = io.join_uri(root, "failures")
    for index, videos in ((1, ["c.mp4"]), (0, ["a.mp4", "b.mp4"])):
        io.write_shard([_failure(video) for video in videos], folder, schemas.FAILURES, index)
    proc = leanpo("inspect", folder, "--rows", "3")
    assert proc.returncode == 0, proc.stderr
    assert "failures v1" in proc.stdout and "3 rows" in proc.stdout
    shown = [proc.stdout.index(f"cannot decode {video}") for video in ("a.mp4", "b.mp4", "c.mp4")]
    assert shown == sorted(shown), proc.stdout


def test_inspect_missing_table_is_a_clear_error(tmp_path):
    proc = leanpo("inspect", str(tmp_path / "nope.parquet"))
    assert proc.returncode == 1 and "nothing stored at" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_the_commands():
    proc = leanpo("--help")
    assert proc.returncode == 0
    for command in ("demo", "run", "server", "serve", "inspect", "toy", "plan", "models"):
        assert command in proc.stdout
