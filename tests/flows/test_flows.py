"""The Prefect flows end to end on a real (temporary) Prefect server: one pipeline round on a toy model.

One module-scoped pipeline run is shared by the assertions: it starts with a real transient fault (the round's
folder is blocked by a stale file, so the first write of the videos table fails with an OSError; the blocking file
is removed when Prefect logs the retry it scheduled), and must end Completed after the retry. A second run with the
same parameters must skip every stage (cache keyed on input content, config and code). Tiny settings: 5 synthetic
clips (3 train, 1 validation, 1 test), 1 candidate per side, the transformers backend, 2 training steps.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                            FlowRunFilterParentFlowRunId, TaskRunFilter, TaskRunFilterFlowRunId)
from prefect.events.filters import EventFilter, EventNameFilter
from prefect.exceptions import ParameterTypeError

from flows.data_refresh import data_refresh
from flows.pipeline import pipeline
from leanpo_core import io, schemas, synthetic, toy
from leanpo_core.layout import RunLayout
from leanpo_core.registry import Registry
from tasks.data import PAIRS_PUBLISHED
from tests.leanpo_core.test_io import assert_every_reader_counts

STAGES = ("ingest", "frames", "sample", "reflect", "pairs", "train", "evaluate")


@pytest.fixture(scope="module")
def parameters(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("flows")
    model = str(toy.build_toy_model("qwen2_vl", tmp / "model", seed=0))
    manifest = str(synthetic.generate(tmp / "synthetic", num=5, seed=0, questions_per_clip=1))
    return {
        "manifest": manifest, "root": str(tmp / "run"), "work_dir": str(tmp / "scratch"),
        "frames": {"num_frames": 4, "max_side": 64},
        "sample": {"model": model, "backend": "transformers", "num_candidates": 1, "max_new_tokens": 8,
                   "max_model_len": 512, "shard_size": 2},
        "reflect": {"backend": "transformers", "judge_max_tokens": 4},
        "pairs": {"trust_filter": False},  # random weights: keep every pair so that training has data
        "train": {"model": model, "max_steps": 2, "per_device_batch_size": 1, "deepspeed": "none",
                  "gradient_checkpointing": False, "learning_rate": 1e-3, "warmup_ratio": 0.0, "save_steps": 100},
        "evaluate": {"backend": "transformers", "split": "test", "max_new_tokens": 4, "max_model_len": 512},
    }


class RetryWatcher(logging.Handler):
    """Removes the blocking file when Prefect's task engine logs that it scheduled a retry (and records that)."""

    def __init__(self, blocker: Path):
        super().__init__()
        self.blocker, self.retries = blocker, []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Retry 1/" in message and self.blocker.is_file():
            self.retries.append(message)
            self.blocker.unlink()


def _descendants(client, flow_run_id) -> list:
    """The flow run and all its subflow runs."""
    runs, frontier = [client.read_flow_run(flow_run_id)], [flow_run_id]
    while frontier:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
        runs += children
        frontier = [c.id for c in children]
    return runs


def _task_runs(flow_run_id) -> dict[str, list]:
    """Task runs of the flow run and its subflows by task name (less the task runs that stand for subflows)."""
    with get_client(sync_client=True) as client:
        flow_runs = _descendants(client, flow_run_id)
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(
            any_=[run.id for run in flow_runs])))
    subflows = {run.parent_task_run_id for run in flow_runs}
    by_name: dict[str, list] = {}
    for run in runs:
        if run.id in subflows:
            continue
        by_name.setdefault(run.name.rsplit("-", 1)[0], []).append(run)  # "<task name>-<dynamic key>"
    return by_name


@pytest.fixture(scope="module")
def first_run(parameters):
    blocker = Path(parameters["root"]) / "round-0"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a stale file where the round's folder goes: writes under it fail until it is removed")
    watcher = RetryWatcher(blocker)
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(watcher)
    try:
        state = pipeline(**parameters, return_state=True)
    finally:
        logger.removeHandler(watcher)
    return state, watcher


def test_transient_fault_is_retried_and_the_pipeline_completes(first_run):
    state, watcher = first_run
    assert state.is_completed(), state.message
    assert len(watcher.retries) == 1  # the one transient failure, then a successful retry
    ingest = _task_runs(state.state_details.flow_run_id)["ingest"]  # the round's, then the held-out questions'
    assert sorted(run.run_count for run in ingest) == [1, 2] and all(run.state.is_completed() for run in ingest)


def test_pipeline_writes_every_table_and_publishes_the_model(first_run, parameters):
    state, _ = first_run
    result = state.result()
    layout = RunLayout(io.join_uri(parameters["root"], "round-0"))
    pairs = io.read_table(layout.pairs, schemas.PAIRS)
    assert pairs.num_rows == 3 and all(pairs.column("kept").to_pylist())  # the 3 train questions
    trained = result["rounds"][0]["train"]
    assert trained["steps"] == 2 and Path(trained["model"], "config.json").exists()
    assert trained["output_dir"].startswith(parameters["work_dir"])  # trained in the scratch folder ...
    record = trained["published"]  # ... and published to the run root
    assert Path(record["model"], "config.json").exists() and Path(record["plot"]).exists()
    metrics = io.read_table(record["metrics"], schemas.TRAIN_METRICS)
    assert metrics.num_rows == io.read_manifest(record["metrics"]).rows == 2  # its manifest was published as well
    evaluation = io.read_table(layout.evaluation(trained["run_id"]), schemas.EVALUATION).to_pylist()
    models = {row["model"] for row in evaluation}
    assert models == {trained["model"], parameters["train"]["model"]}  # trained vs the model it started from
    assert result["model"] == trained["model"]
    gate = trained["gate"]  # a further round starts from the promoted model, else from where this one started
    current = Registry(io.join_uri(parameters["root"], "registry")).current("production")
    assert result["next_model"] == (current["model_uri"] if gate["promote"] else parameters["sample"]["model"])
    sharded = sorted({str(p.parent) for p in Path(parameters["root"]).rglob("part-*.parquet")})
    assert {Path(folder).name for folder in sharded} >= {"frames", "samples", "scored"}  # and failures/<stage>
    for folder in sharded:
        assert_every_reader_counts(folder)


def test_artifacts_tables_reports_and_progress(first_run):
    state, _ = first_run
    with get_client(sync_client=True) as client:
        ids = [run.id for run in _descendants(client, state.state_details.flow_run_id)]
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=ids)))
    by_key = {a.key: a for a in artifacts}
    for table in ("videos", "frames", "samples", "scored", "pairs", "train-metrics", "evaluation"):
        assert f"{table}-table" in by_key and f"{table}-sample" in by_key, table
        assert by_key[f"{table}-sample"].type == "table"
    for key in ("sample-progress", "train-progress"):
        assert by_key[key].type == "progress" and float(by_key[key].data) == 100.0
    refresh = by_key["data-refresh-report"].data
    assert "## Pairs: 3 kept of 3" in refresh and "Score distributions" in refresh and "Failures" in refresh
    train_report = by_key["train-report"].data
    assert "data:image/png;base64," in train_report and "answer_logp" in train_report
    assert "pipeline-report" in by_key


def test_rerun_skips_every_finished_stage(first_run, parameters):
    first = first_run[0].result()
    state = pipeline(**parameters, return_state=True)
    assert state.is_completed()
    runs = _task_runs(state.state_details.flow_run_id)
    for stage in STAGES:
        assert runs[stage] and all(run.state.name == "Cached" for run in runs[stage]), stage
    again = state.result()
    assert again["model"] == first["model"]
    assert again["rounds"][0]["refresh"]["announced"] is False  # nothing new: no event


def test_changed_config_recomputes_only_the_stages_after_it(first_run, parameters):
    refresh = {k: parameters[k] for k in ("manifest", "sample", "frames", "reflect")}
    root = io.join_uri(parameters["root"], "round-0")
    state = data_refresh(**refresh, root=root, pairs={"trust_filter": True}, return_state=True)
    assert state.is_completed()
    runs = _task_runs(state.state_details.flow_run_id)
    assert all(runs[stage][0].state.name == "Cached" for stage in ("ingest", "frames", "sample", "reflect"))
    assert runs["pairs"][0].state.name == "Completed"
    assert state.result()["announced"] is True
    # The pipeline trained on its own pairs without announcing them; this refresh's new table is announced once.
    found = []
    with get_client(sync_client=True) as client:
        for _ in range(120):  # events are stored asynchronously: wait for it (up to a minute)
            page = client.read_events(filter=EventFilter(event=EventNameFilter(name=[PAIRS_PUBLISHED])), limit=50)
            found = [e for e in page.events if e.resource.id == f"leanpo.pairs.{root}"]
            if found:
                break
            time.sleep(0.5)
    time.sleep(2)  # a second (wrong) event from the pipeline run would be stored by now as well
    with get_client(sync_client=True) as client:
        page = client.read_events(filter=EventFilter(event=EventNameFilter(name=[PAIRS_PUBLISHED])), limit=50)
    found = [e for e in page.events if e.resource.id == f"leanpo.pairs.{root}"]
    assert len(found) == 1
    payload = found[0].payload
    assert payload["root"] == root and payload["uri"] == RunLayout(root).pairs
    kept = io.read_table(RunLayout(root).pairs, schemas.PAIRS).column("kept").to_pylist()
    assert payload["rows"] == 3 and payload["kept"] == sum(kept) and len(payload["content_hash"]) == 64


def test_bad_config_fails_before_any_work(parameters, tmp_path):
    bad = {**parameters, "root": str(tmp_path / "never"), "sample": {**parameters["sample"], "num_candidates": 0}}
    with pytest.raises(ParameterTypeError, match=r"sample\.num_candidates"):
        pipeline(**bad)
    assert not (tmp_path / "never").exists()


def test_gpu_slot_takes_turns_only_under_a_gpu_limit():
    """Two tasks that hold a model run side by side when no `gpu` limit exists (nothing is acquired) and take turns
    once an operator creates it (`prefect gcl create gpu --limit 1`)."""
    from prefect import flow, task
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from tasks.common import GPU_LIMIT, gpu_slot

    @task
    def hold(i: int) -> tuple[float, float]:
        with gpu_slot():
            start = time.monotonic()
            time.sleep(1.5)
            return start, time.monotonic()

    @flow
    def two() -> list[tuple[float, float]]:
        futures = [hold.submit(i) for i in range(2)]
        return [future.result() for future in futures]

    def overlap(spans: list[tuple[float, float]]) -> bool:
        (_, first_end), (second_start, _) = sorted(spans)
        return second_start < first_end

    assert overlap(two())
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1))
    try:
        assert not overlap(two())
    finally:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(GPU_LIMIT)
