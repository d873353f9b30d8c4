"""The data refresh with `task_runner="dask"`: frames and scoring shards as Prefect tasks on a real Dask
`LocalCluster` of 2 worker processes (tasks/scale.py), on the temporary Prefect server; and the frames shards on a
real local Ray cluster (`task_runner="ray"`, prefect-ray) against the same thread run.

Default suite (frames shards; no model): the frames stage as the data-refresh flow wires it, run once with the
thread runner and once on Dask, over 6 synthetic clips in 3 shards. During the Dask run a watcher SIGKILLs the Dask
worker process that is decoding a frames shard, as soon as its decode process appears (before anything of the
shard is written); the cluster reruns the shard on a live worker. The frames shards must still be the thread
run's, byte for byte, each video stored once. The credential grep of tests/reliability/test_security.py then runs
over a Dask run on the S3 server.

Slow (`-m slow`; a toy model in every scoring shard's process, about 2-4 min on 2 cores): the whole data refresh
on both runners, scored shards and pairs compared as well.

    .venv/bin/python -m pytest tests/flows/test_dask.py [-m slow]
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from prefect import flow, get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

from flows.data_refresh import data_refresh
from leanpo_core import io, schemas, synthetic, toy
from leanpo_core.config import ConfigError, FramesConfig
from leanpo_core.layout import RunLayout
from tasks import data, scale
from tests.reliability.test_security import _flow_run_texts, s3_dataset


class WorkerKiller(threading.Thread):
    """SIGKILLs, once, the Dask worker process (a child of this test process) whose frames decode process has just
    started: the worker is then inside a frames shard, before the shard's table is written."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.killed: psutil.Process | None = None
        self.decoder: psutil.Process | None = None
        self.listening: list[str] = []

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.wait(0.02):
            try:
                for child in me.children(recursive=True):
                    if "leanpo_core.decode_worker" in " ".join(child.cmdline()) and child.ppid() != me.pid:
                        worker = psutil.Process(child.ppid())
                        self.listening = [c.laddr.ip for p in (me, *me.children(recursive=True))
                                          for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
                        self.decoder, self.killed = child, worker
                        worker.send_signal(signal.SIGKILL)
                        return
            except psutil.Error:
                continue  # a process ended while we looked at it


FRAMES = FramesConfig(num_frames=4, max_side=64, shard_size=2)


@flow(name="frames-on-shards")
def frames_stage(manifest: str, root: str, frames: FramesConfig, task_runner: str = "thread") -> dict:
    """Ingest and frames wired as in flows/data_refresh.py."""
    runner = scale.shard_runner(task_runner)
    with scale.running(runner):
        videos = data.ingest(manifest, root, split=None)
        return data.frames(root, frames, videos, wait_for=data.frames_shards(runner, root, frames, videos))


@pytest.fixture(scope="module")
def frames_runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("dask-frames")
    manifest = str(synthetic.generate(tmp / "synthetic", num=6, seed=0, questions_per_clip=1))
    thread = frames_stage(manifest, str(tmp / "thread"), FRAMES, return_state=True)
    killer = WorkerKiller()
    killer.start()
    try:
        dask = frames_stage(manifest, str(tmp / "dask"), FRAMES, task_runner="dask", return_state=True)
    finally:
        killer.stop.set()
        killer.join()
    return {"thread": thread, "dask": dask, "killer": killer, "manifest": manifest,
            "thread_layout": RunLayout(str(tmp / "thread")), "dask_layout": RunLayout(str(tmp / "dask"))}


def _shard_hashes(folder: str) -> dict[int, str]:
    return {i: io.read_manifest(uri).content_hash for i, uri in io.shard_uris(folder).items()}


def _task_runs(state) -> dict[str, list]:
    """Task runs of one flow run by task name."""
    with get_client(sync_client=True) as client:
        found = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(
            any_=[state.state_details.flow_run_id])))
    by_name: dict[str, list] = {}
    for run in found:
        by_name.setdefault(run.name.rsplit("-", 1)[0], []).append(run)  # "<task name>-<dynamic key>"
    return by_name


def test_dask_frames_shards_are_the_thread_runs(frames_runs):
    """The same bytes in every frames shard (frames rows carry no clock time), one task run per shard."""
    assert frames_runs["thread"].is_completed() and frames_runs["dask"].is_completed(), frames_runs["dask"].message
    expected = _shard_hashes(frames_runs["thread_layout"].frames)
    assert len(expected) == 3 and _shard_hashes(frames_runs["dask_layout"].frames) == expected
    assert frames_runs["dask"].result()["content_hash"] == frames_runs["thread"].result()["content_hash"]
    runs = _task_runs(frames_runs["dask"])
    assert len(runs["frames-shard"]) == 3 and all(run.state.is_completed() for run in runs["frames-shard"])
    assert "frames-shard" not in _task_runs(frames_runs["thread"])  # the thread runner: one task for the stage


def test_a_killed_worker_is_survived_without_duplicate_rows(frames_runs):
    """The worker was killed inside a shard; the shard ran again on a live worker, each video is stored once, the
    killed worker's decode process did not outlive it, and the cluster listened on loopback only. (The server does
    not see the killed attempt: a task run's states reach it as events, and the killed process never sent its.)"""
    killer = frames_runs["killer"]
    assert killer.killed is not None, "no Dask worker was seen decoding"
    assert frames_runs["dask"].is_completed(), frames_runs["dask"].message
    layout = frames_runs["dask_layout"]
    keys = io.read_dataset(layout.frames, schemas.FRAMES).column("video_key").to_pylist()
    assert len(keys) == len(set(keys)) == 6
    assert io.read_dataset(layout.failures("frames"), schemas.FAILURES).num_rows == 0
    deadline = time.monotonic() + 30
    while killer.decoder.is_running() and killer.decoder.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the killed worker's decode process outlived it"
        time.sleep(0.2)
    assert killer.listening and all(ipaddress.ip_address(ip).is_loopback for ip in killer.listening), \
        killer.listening


def test_ray_frames_shards_are_the_thread_runs(frames_runs, tmp_path):
    """On a local Ray cluster (2 CPUs): the same bytes in every frames shard as the thread run's, one task run per
    shard, each video stored once. (Unlike Dask's, Ray's own servers listen on every interface whatever node address
    they are given: docs/operations.md, section 6.)"""
    state = frames_stage(frames_runs["manifest"], str(tmp_path / "ray"), FRAMES, task_runner="ray",
                         return_state=True)
    assert state.is_completed(), state.message
    layout = RunLayout(str(tmp_path / "ray"))
    expected = _shard_hashes(frames_runs["thread_layout"].frames)
    assert len(expected) == 3 and _shard_hashes(layout.frames) == expected
    assert state.result()["content_hash"] == frames_runs["thread"].result()["content_hash"]
    keys = io.read_dataset(layout.frames, schemas.FRAMES).column("video_key").to_pylist()
    assert len(keys) == len(set(keys)) == 6
    runs = _task_runs(state)
    assert len(runs["frames-shard"]) == 3 and all(run.state.is_completed() for run in runs["frames-shard"])


def test_task_runner_setting_is_checked_before_any_work():
    with pytest.raises(ConfigError, match="cluster_address"):
        scale.shard_runner("thread", "tcp://127.0.0.1:8786")
    with pytest.raises(ConfigError, match="local_workers"):
        scale.shard_runner("dask", local_workers=0)
    with pytest.raises(ConfigError, match="local_workers"):
        scale.shard_runner("ray", local_workers=0)
    with pytest.raises(ConfigError, match="one of thread, dask, ray"):
        scale.shard_runner("spark")


def test_no_credential_in_any_output_of_a_dask_run(tmp_path, s3_server, s3_root, capfd):
    """test_security's leak check over a Dask run on the S3 server (a broken clip included): every stored object,
    every file under PREFECT_HOME, the flow run's logs and artifacts (the workers' task runs included) and all
    output of this process and its Dask workers hold neither the access key nor the secret."""
    fs = s3_server.filesystem()
    bucket_root = s3_root.removeprefix("s3://")
    root = f"{s3_root}/run"
    state = frames_stage(s3_dataset(tmp_path, s3_server, s3_root), root, FRAMES, task_runner="dask",
                         return_state=True)
    assert state.is_completed(), state.message
    failures = io.read_dataset(f"{root}/failures/frames", schemas.FAILURES).to_pylist()
    assert [f["error_type"] for f in failures] == ["DecodeError"]
    texts = _flow_run_texts(state.state_details.flow_run_id, "frames shard 1: 0 decoded, 1 failed")
    assert any("frames shard 1: 0 decoded, 1 failed" in t for t in texts)  # a worker's log was really read
    blobs = [fs.cat_file(path) for path in fs.find(bucket_root)]
    assert any(b.startswith(b"PAR1") for b in blobs)
    blobs += [p.read_bytes() for p in Path(os.environ["PREFECT_HOME"]).rglob("*") if p.is_file()]
    captured = capfd.readouterr()
    texts += [captured.out, captured.err]
    for secret in (s3_server.secret, s3_server.key):
        for text in texts:
            assert secret not in text, f"credential leaked into: {text[:300]!r}"
        for blob in blobs:
            assert secret.encode() not in blob


@pytest.mark.slow
def test_data_refresh_on_dask_writes_the_tables_of_the_thread_run(tmp_path):
    """The whole data refresh on both runners (6 clips: 3 frames shards, 2 samples shards, toy model). The Dask run
    starts from a copy of the thread run's samples (sampling is one task on either runner and is not compared);
    its frames and scored shards, videos and pairs are the thread run's (pairs up to the root in `frames_uri`)."""
    model = str(toy.build_toy_model("qwen2_vl", tmp_path / "model", seed=0))
    manifest = str(synthetic.generate(tmp_path / "synthetic", num=6, seed=0, questions_per_clip=1))
    parameters = {
        "manifest": manifest, "split": "", "announce": False, "frames": FRAMES,
        "sample": {"model": model, "backend": "transformers", "num_candidates": 1, "max_new_tokens": 8,
                   "max_model_len": 512, "shard_size": 3},
        "reflect": {"backend": "transformers", "judge_max_tokens": 4},
        "pairs": {"trust_filter": False},
    }
    thread_root, dask_root = tmp_path / "thread", tmp_path / "dask"
    assert data_refresh(**parameters, root=str(thread_root), return_state=True).is_completed()
    shutil.copytree(thread_root / "samples", dask_root / "samples")
    state = data_refresh(**parameters, root=str(dask_root), task_runner="dask", return_state=True)
    assert state.is_completed(), state.message
    runs = _task_runs(state)
    assert len(runs["frames-shard"]) == 3 and len(runs["reflect-shard"]) == 2
    thread, dask = RunLayout(str(thread_root)), RunLayout(str(dask_root))
    for table in ("frames", "scored"):
        expected = _shard_hashes(getattr(thread, table))
        assert expected and _shard_hashes(getattr(dask, table)) == expected, table
    assert io.read_manifest(dask.videos).content_hash == io.read_manifest(thread.videos).content_hash

    def pairs(layout: RunLayout, root: Path) -> list[dict]:
        rows = io.read_table(layout.pairs, schemas.PAIRS).to_pylist()
        return [{**r, "frames_uri": str(Path(r["frames_uri"]).relative_to(root))} for r in rows]

    assert pairs(dask, dask_root) == pairs(thread, thread_root) and len(pairs(dask, dask_root)) == 6
