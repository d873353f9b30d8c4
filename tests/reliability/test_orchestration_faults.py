"""Faults the orchestration must survive (issue 7), each with real components: a real Prefect server, the product's
Prefect tasks with their own retry settings, real `python -m leanpo_core.<stage>` children (real vLLM on CPU, a
real Trainer), real SIGKILLs.

- The vLLM sampling child SIGKILLed right after its first shard is stored: Prefect retries the `sample` task (the
  launcher's LaunchError for a signal is transient), the retry keeps the stored shard byte for byte and the table
  ends with one row per (question, side, candidate).
- The training child SIGKILLed once checkpoint-1 is marked complete: Prefect retries the `train` task, which
  resumes from the newest complete checkpoint (checkpoint-1 is not rewritten, the retried attempt's first logged
  step is past 1, the metrics table has each step once).
- The Prefect worker's process group SIGKILLed while its flow run works (slow): the flow run stops heart-beating,
  the server's zombie automation (Prefect's documented "Crash zombie flows" proactive trigger) marks it Crashed,
  and a re-run by a new worker completes, taking the stages the crashed run finished from the cache. The stage
  child the flow run had launched stops with it (it watches its launcher: `launch.stage_entry`).

Children are found by a tag in their environment (/proc/<pid>/environ): the tasks pass the orchestrator's
environment to what they launch.

    .venv/bin/python -m pytest tests/reliability/test_orchestration_faults.py -p no:cacheprovider        # 1 and 2
    .venv/bin/python -m pytest tests/reliability/test_orchestration_faults.py -m slow -p no:cacheprovider  # 3
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from prefect import flow, get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

from leanpo_core import io, schemas, synthetic, toy
from leanpo_core.config import FramesConfig, SampleConfig, TrainConfig
from leanpo_core.layout import RunLayout
from leanpo_core.train import CHECKPOINT_COMPLETE
from tasks import data
from tasks import train as train_tasks
from tests.flows.conftest import PREFECT, REPO, SMALL_RUN, SMALL_SAMPLE, TERMINAL, prefect_stack, stop, tail  # noqa: F401

TAG = "LEANPO_FAULT_TEST"


def _tagged_pids(tag: str, module: str) -> list[int]:
    """Processes running `python -m <module>` whose environment holds TAG=tag."""
    want = f"{TAG}={tag}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if module.encode() in cmdline and want in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:  # gone, or not ours
            continue
    return pids


def _kill_when(ready, tag: str, module: str, finished: threading.Event, record: dict) -> threading.Thread:
    """A thread that SIGKILLs the tagged `module` child once `ready()` holds (then calls `record['after']()`)."""

    def watch() -> None:
        while not finished.is_set():
            if ready():
                pids = _tagged_pids(tag, module)
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                record["pids"] = pids
                record["after"] = record["snapshot"]()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _task_runs(flow_run_id, name: str) -> list:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(
            any_=[flow_run_id])))
        found = [run for run in runs if run.name.rsplit("-", 1)[0] == name]
        return [(run, [s.name for s in client.read_task_run_states(run.id)]) for run in found]


class Lines(logging.Handler):
    """Collects the messages of Prefect's task-run logger (where the tasks stream their children's output)."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "Lines":
        logging.getLogger("prefect.task_runs").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("prefect.task_runs").removeHandler(self)


def _fingerprint(path: Path) -> tuple[int, str]:
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory) -> str:
    return str(toy.build_toy_model("qwen2_vl", tmp_path_factory.mktemp("model") / "qwen2_vl", seed=0))


@pytest.fixture
def tag(monkeypatch) -> str:
    """A unique tag in this process's environment, so in every child the tasks launch (they pass os.environ on)."""
    value = uuid.uuid4().hex
    monkeypatch.setenv(TAG, value)
    return value


@flow(name="fault-sample")
def sample_flow(manifest: str, root: str, sample: SampleConfig) -> dict:
    videos = data.ingest(manifest, root, None)
    frames = data.frames(root, FramesConfig(num_frames=4, max_side=64), videos)
    return data.sample(root, sample, videos, frames)


def test_vllm_child_killed_after_first_shard_is_retried_and_keeps_that_shard(toy_model, tag, tmp_path):
    """Real vLLM (CPU, in the stage's own process) over 4 synthetic questions in 4 shards; SIGKILL once shard 0 is
    stored. The product's retry settings apply (first retry after 10 s)."""
    manifest = str(synthetic.generate(tmp_path / "syn", num=4, seed=7, questions_per_clip=1))
    root = str(tmp_path / f"run-{uuid.uuid4().hex}")  # a root no earlier session cached results for
    config = SampleConfig(model=toy_model, backend="vllm", num_candidates=2, max_new_tokens=32, max_model_len=512,
                          max_num_seqs=4, shard_size=1, seed=3)
    samples = RunLayout(root).samples
    first = Path(io.shard_uri(samples, 0))
    last_manifest = Path(io.manifest_uri(io.shard_uri(samples, 3)))
    record = {"snapshot": lambda: {"first": _fingerprint(first), "last_done": last_manifest.exists()}}
    finished = threading.Event()
    killer = _kill_when(lambda: Path(io.manifest_uri(str(first))).exists(), tag, "leanpo_core.sample", finished,
                        record)
    try:
        with Lines() as lines:
            state = sample_flow(manifest, root, config, return_state=True)
    finally:
        finished.set()
        killer.join()
    assert record.get("pids"), "the sampling child was never found to kill"
    assert not record["after"]["last_done"], "the kill came after the last shard: nothing was left to retry"
    assert state.is_completed(), state.message

    (run, states), = _task_runs(state.state_details.flow_run_id, "sample")
    assert run.run_count == 2 and run.state.is_completed(), (run.run_count, states)
    assert "AwaitingRetry" in states and "Retrying" in states, states
    assert _fingerprint(first) == record["after"]["first"]  # stored before the kill, not redone by the retry
    summaries = [m for m in lines.messages if re.match(r"samples: \d+ rows written", m)]  # the stage's last lines
    assert len(summaries) == 1, (summaries, lines.messages[-20:])  # only the retry got to print one
    skipped = int(re.search(r"written, (\d+) of \d+ shard", summaries[0]).group(1))
    assert skipped >= 1, summaries
    rows = io.read_dataset(samples, schemas.SAMPLES).to_pylist()
    keys = [(r["id"], r["side"], r["candidate"]) for r in rows]
    assert len(keys) == len(set(keys)) == 4 * 2 * 2  # 4 questions x 2 sides x 2 candidates, none twice
    assert state.result()["rows"] == len(rows)


@flow(name="fault-train")
def train_flow(manifest: str, root: str, config: TrainConfig) -> dict:
    videos = data.ingest(manifest, root, None)
    frames = data.frames(root, FramesConfig(num_frames=4, max_side=64), videos)
    pairs = train_tasks.sft_pairs(RunLayout(root).pairs, videos, frames)
    run_id = train_tasks.run_id_for(config, pairs)
    # The product waits a minute before retrying training (a lost host may need it); the retry itself is the same.
    retried = train_tasks.train.with_options(retry_delay_seconds=1)
    return retried(config, pairs, frames, train_tasks.output_dir_for(root, run_id), run_id)


def _tensorboard_steps(output_dir: Path) -> list[list[int]]:
    """The steps each Trainer attempt logged train/loss at, one list per TensorBoard run folder, oldest first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    attempts = []
    for folder in sorted((output_dir / "runs").iterdir(), key=lambda p: p.stat().st_mtime_ns):
        events = EventAccumulator(str(folder))
        events.Reload()
        attempts.append([e.step for e in events.Scalars("train/loss")] if "train/loss" in events.Tags()["scalars"]
                        else [])
    return attempts


def test_training_child_killed_after_checkpoint_is_retried_and_resumes(toy_model, tag, tmp_path):
    """A real Trainer (one CPU process) saving every step; SIGKILL once checkpoint-1 is complete."""
    manifest = str(synthetic.generate(tmp_path / "syn", num=3, seed=11, questions_per_clip=1))
    root = tmp_path / f"run-{uuid.uuid4().hex}"  # a root no earlier session cached results for
    config = TrainConfig(model=toy_model, objective="sft", max_steps=4, save_steps=1, per_device_batch_size=1,
                         deepspeed="none", gradient_checkpointing=False, learning_rate=1e-3, warmup_ratio=0.0,
                         seed=0)
    train_root = root / "train"
    marker = lambda step: next(train_root.glob(f"*/checkpoint-{step}/{CHECKPOINT_COMPLETE}"), None)

    def snapshot() -> dict:
        checkpoint = marker(1).parent
        return {"checkpoint-1": {p.name: _fingerprint(p) for p in checkpoint.iterdir() if p.is_file()},
                "last_done": marker(config.max_steps) is not None}

    record = {"snapshot": snapshot}
    finished = threading.Event()
    killer = _kill_when(lambda: marker(1) is not None, tag, "leanpo_core.train", finished, record)
    try:
        state = train_flow(str(manifest), str(root), config, return_state=True)
    finally:
        finished.set()
        killer.join()
    assert record.get("pids"), "the training child was never found to kill"
    assert not record["after"]["last_done"], "the kill came after the last step: nothing was left to resume"
    assert state.is_completed(), state.message

    (run, states), = _task_runs(state.state_details.flow_run_id, "train")
    assert run.run_count == 2 and run.state.is_completed(), (run.run_count, states)
    assert "AwaitingRetry" in states and "Retrying" in states, states
    trained = state.result()
    output_dir = Path(trained["output_dir"])
    checkpoint = output_dir / "checkpoint-1"
    # Resumed, not restarted: a restart would have saved checkpoint-1 again.
    assert {p.name: _fingerprint(p) for p in checkpoint.iterdir() if p.is_file()} == record["after"]["checkpoint-1"]
    attempts = _tensorboard_steps(output_dir)  # the killed attempt's events may never have been flushed
    resumed = attempts[-1]
    assert len(attempts) == 2 and resumed and resumed[0] > 1, attempts
    assert resumed[-1] == config.max_steps == trained["steps"]
    steps = io.read_table(trained["metrics"]["uri"], schemas.TRAIN_METRICS).column("step").to_pylist()
    assert steps == list(range(1, config.max_steps + 1))  # each step once
    assert all((output_dir / f"checkpoint-{s}" / CHECKPOINT_COMPLETE).is_file() for s in steps)
    assert Path(trained["model"], "config.json").is_file()


# ---------------------------------------------------------------- the worker killed mid-flow (slow)

HEARTBEAT_S = 30  # Prefect's smallest flow-run heartbeat interval
HEARTBEAT = "prefect.flow-run.heartbeat"


def _zombie_automation() -> dict:
    """Prefect's documented "Crash zombie flows" automation: a flow run that sent a heartbeat and then neither
    another heartbeat nor a final state within three intervals is set Crashed."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    automation = AutomationCore(
        name="crash-zombie-flows",
        trigger=EventTrigger(after={HEARTBEAT}, expect={HEARTBEAT, "prefect.flow-run.Completed",
                                                        "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                                                        "prefect.flow-run.Crashed"},
                             match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                             for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                             within=timedelta(seconds=3 * HEARTBEAT_S)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"No heartbeat for {3 * HEARTBEAT_S} s: marked Crashed")])
    return automation.model_dump(mode="json")


def _stage_pids(tag: str) -> list[int]:
    """The data refresh's stage children (the ones run as `python -m leanpo_core.<stage>`) carrying the tag."""
    return [pid for module in ("leanpo_core.sample", "leanpo_core.reflect") for pid in _tagged_pids(tag, module)]


def _kill_stages(tag: str) -> None:
    for pid in _stage_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _heartbeats(stack, flow_run_id: str) -> int:
    page = stack.api("POST", "/events/filter", json={"filter": {
        "event": {"name": [HEARTBEAT]}, "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]}}, "limit": 50})
    return len(page["events"])


def _wait(stack, flow_run_id: str, done, timeout_s: float, what: str, worker=None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = stack.api("GET", f"/flow_runs/{flow_run_id}")
        if done(run):
            return run
        if worker is not None:
            assert worker.poll() is None, f"the worker exited:\n{tail(stack.workdir / 'fault-worker.log')}"
        time.sleep(2)
    pytest.fail(f"{what} not seen within {timeout_s:.0f} s; flow run state {run['state']['name']}; worker log:\n"
                f"{tail(stack.workdir / 'fault-worker.log')}")


class StageOutlivedWorker(AssertionError):
    """A `python -m leanpo_core.<stage>` child still running after its flow-run process was SIGKILLed."""


@pytest.mark.slow
def test_worker_killed_mid_flow_run_is_marked_crashed_and_a_rerun_resumes(prefect_stack, tmp_path):
    """A `data-refresh` deployment run on a process worker; the worker's process group (worker + flow-run process)
    SIGKILLed while the sampling stage works; the zombie automation crashes the run; a new worker's run of the same
    parameters completes and takes ingest and frames from the cache, and sampling keeps the shards already stored.

    The stage child must die with the flow-run process that launched it (StageOutlivedWorker otherwise).
    """
    stack = prefect_stack
    automation = stack.api("POST", "/automations/", json=_zombie_automation())
    deployment = stack.deployment("data-refresh", "data-refresh")
    root = str(tmp_path / f"round-{uuid.uuid4().hex}")
    parameters = {**SMALL_RUN, "root": root,
                  "sample": {**deployment["parameters"]["sample"], **SMALL_SAMPLE, "shard_size": 1}}
    tag = uuid.uuid4().hex
    env = {**stack.env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S), TAG: tag}

    def start_worker() -> subprocess.Popen:
        with open(stack.workdir / "fault-worker.log", "ab") as out:
            return subprocess.Popen([PREFECT, "worker", "start", "--pool", "leanpo-local", "--work-queue", "default"],
                                    cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def create_run() -> dict:
        return stack.api("POST", f"/deployments/{deployment['id']}/create_flow_run",
                         json={"parameters": parameters, "idempotency_key": f"fault-{uuid.uuid4()}"})

    samples = RunLayout(root).samples
    first_shard = Path(io.shard_uri(samples, 0))
    try:
        crashed = create_run()
        worker = start_worker()
        try:
            _wait(stack, crashed["id"], lambda r: r["state"]["type"] == "RUNNING" and _heartbeats(stack, r["id"])
                  and Path(io.manifest_uri(str(first_shard))).exists(), 600, "a heart-beating run past shard 0",
                  worker)
            shard = _fingerprint(first_shard)
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            # The worker's whole process group is gone and reaped by now; the stage child, in its own session,
            # notices that its launcher is gone (launch.stage_entry polls every second) and kills its group.
            for _ in range(60):
                orphans = _stage_pids(tag)
                if not orphans:
                    break
                time.sleep(0.5)
        finally:
            stop(worker)
        _kill_stages(tag)  # whatever outlived the worker: reported at the end, kept out of the re-run's way

        run = _wait(stack, crashed["id"], lambda r: r["state"]["type"] in TERMINAL, 6 * HEARTBEAT_S + 120,
                    "a final state after the kill")
        assert run["state"]["type"] == "CRASHED", run["state"]

        rerun = create_run()
        worker = start_worker()
        try:
            run = _wait(stack, rerun["id"], lambda r: r["state"]["type"] in TERMINAL, 600, "the re-run's end",
                        worker)
        finally:
            stop(worker)
        assert run["state"]["type"] == "COMPLETED", run["state"]
        tasks = stack.api("POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [rerun["id"]]}}})
        states = {t["name"].rsplit("-", 1)[0]: t["state"]["name"] for t in tasks}
        assert states["ingest"] == states["frames"] == "Cached", states
        assert states["sample"] == "Completed", states
        assert _fingerprint(first_shard) == shard  # shard-resumed, not redone
        rows = io.read_dataset(samples, schemas.SAMPLES).to_pylist()
        keys = [(r["id"], r["side"], r["candidate"]) for r in rows]
        assert len(keys) == len(set(keys)) and keys
    finally:
        _kill_stages(tag)
        # Other tests share this server; their flow runs send no heartbeats this often and must not be crashed.
        stack.api("DELETE", f"/automations/{automation['id']}")
    if orphans:
        raise StageOutlivedWorker(f"the stage child {orphans} outlived the worker and its flow-run process")
