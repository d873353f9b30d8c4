"""The evaluation gate inside the `train` flow (temporary Prefect server): the first candidate beats its starting
model and becomes current, announcing `leanpo.model.promoted`; a later, worse candidate is evaluated against the
current model on the same questions, rejected with a reason row, and `current` stays.

Training and evaluation are stand-ins here (the flow's `train` and `evaluate` tasks swapped for tasks that write a
model folder and an evaluation table with chosen accuracies); publish, the registry, the gate, the event and the
report are the real ones. The full stages run in tests/flows/test_flows.py, whose pipeline goes through the gate.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prefect import get_client, task
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.events.filters import EventFilter, EventNameFilter

from flows.train import train_flow
from leanpo_core import io, schemas
from leanpo_core.layout import RunLayout
from leanpo_core.registry import Registry
from tasks import train as train_tasks
from tasks.gate import MODEL_PROMOTED

ACCURACY: dict[str, float] = {}  # model folder -> its answer accuracy on the held-out questions (chosen per test)


@task(name="train")
def fake_train(config, pairs, frames, output_dir, run_id, nproc_per_node=1, launcher="auto") -> dict:
    model = Path(output_dir) / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text("{}")
    return {"run_id": run_id, "objective": config.objective, "base_model": config.model, "output_dir": output_dir,
            "model": str(model), "metrics": {}, "plot": str(Path(output_dir) / "metrics.png"), "steps": 2,
            "final_loss": 0.5, "uri": output_dir, "content_hash": run_id}


@task(name="evaluate")
def fake_evaluate(trained, config, videos, frames, out, run_id, pairs=None, baseline=None, timeout_s=None) -> dict:
    from leanpo_core.evaluate import answers_uri, report_uri

    rows = [{"run_id": run_id, "model": m, "split": "test", "metric": metric, "value": value, "n": 200}
            for m in (trained["model"], baseline)
            for metric, value in (("answer_accuracy", ACCURACY[str(Path(m).resolve())]), ("answer_f1", 0.5))]
    manifest = io.write_table(rows, out, schemas.EVALUATION)
    io.write_bytes(report_uri(out), b"# Evaluation\n\n(stand-in)\n")
    return {**manifest.to_dict(), "report": report_uri(out), "model": trained["model"], "baseline": baseline,
            "answers": answers_uri(out), "metrics": rows}


@pytest.fixture
def root(tmp_path, monkeypatch) -> str:
    monkeypatch.setattr(train_tasks, "train", fake_train)
    monkeypatch.setattr(train_tasks, "evaluate", fake_evaluate)
    layout = RunLayout(str(tmp_path / "run"))
    io.write_table([], layout.pairs, schemas.PAIRS)
    io.write_table([], layout.videos, schemas.VIDEOS)
    io.write_table([], io.join_uri(layout.frames, "part-00000.parquet"), schemas.FRAMES)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    ACCURACY.clear()
    ACCURACY[str(base.resolve())] = 0.50
    return layout.root


def _run(root: str, run_id: str, accuracy: float) -> dict:
    ACCURACY[str(Path(RunLayout(root).train(run_id), "model").resolve())] = accuracy
    base = str(Path(root).parent / "base")
    state = train_flow(root, {"model": base, "objective": "leanpo"}, run_id=run_id, return_state=True)
    assert state.is_completed(), state.message
    return {"state": state, **state.result()}


def _events(model_id: str, timeout_s: float = 60) -> list:
    found = []
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            page = client.read_events(filter=EventFilter(event=EventNameFilter(name=[MODEL_PROMOTED])), limit=50)
            found = [e for e in page.events if e.payload.get("model_id") == model_id]
            if found:
                break
            time.sleep(0.5)
    return found


def test_better_candidate_is_promoted_and_a_worse_one_rejected(root):
    registry = Registry(RunLayout(root).registry)
    first = _run(root, "r1", 0.60)  # vs the starting model 0.50: +0.10 > margin 0.01
    gate = first["gate"]
    assert gate["action"] == "promoted" and gate["current_before"] is None, gate
    assert registry.current("production")["model_id"] == "r1"
    assert registry.get("r1")["model_uri"] == str(Path(RunLayout(root).train("r1"), "model"))
    (event,) = _events("r1")
    assert event.resource.id == "leanpo.model.production"
    assert event.payload["alias"] == "production" and event.payload["registry"] == registry.uri
    assert event.payload["model_uri"] == registry.get("r1")["model_uri"]

    second = _run(root, "r2", 0.55)  # better than the base model, worse than the current r1
    gate = second["gate"]
    assert gate["action"] == "rejected" and gate["current_before"] == "r1", gate
    assert gate["comparison"].endswith("r2-vs-r1.parquet")  # evaluated against the current model, not the base
    assert registry.current("production")["model_id"] == "r1"  # unchanged
    rejected = registry.get("r2")
    assert rejected["status"] == "rejected"
    assert rejected["rejected"]["reason"] == ("gate: answer_accuracy 0.5500 vs 0.6000: -0.0500 is not above the "
                                              "margin +0.01")
    time.sleep(1)
    assert not _events("r2", timeout_s=2)  # no promotion, no event

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[second["state"].state_details.flow_run_id])))
    report = next(a for a in artifacts if a.key == "train-report").data
    assert "## Evaluation gate" in report and "**rejected**" in report and "current `r1`" in report
    assert "| answer_accuracy | primary | 0.5500 | 0.6000 | -0.0500 | > +0.01 | fail |" in report
    assert "| answer_f1 | guarded | 0.5000 | 0.5000 | +0.0000 | >= -0.02 | pass |" in report


def test_gate_off_registers_nothing(root):
    base = str(Path(root).parent / "base")
    ACCURACY[str(Path(RunLayout(root).train("r0"), "model").resolve())] = 0.9
    result = train_flow(root, {"model": base}, run_id="r0", gate={"enabled": False})
    assert result["gate"] is None and Registry(RunLayout(root).registry).models() == []


def test_pipeline_rounds_start_from_the_current_model(root):
    """After a round, the pipeline's next round starts from the alias's current (promoted) model, as the registry
    keeps it; a rejected candidate is never built on; with the gate off, the newest model is."""
    from flows.pipeline import next_model
    from leanpo_core.gate import GateConfig

    gate = GateConfig(registry=RunLayout(root).registry)
    base = str(Path(root).parent / "base")
    first = _run(root, "r1", 0.60)  # promoted
    assert next_model(first, gate, previous=base) == Registry(gate.registry).get("r1")["model_uri"]
    second = _run(root, "r2", 0.55)  # rejected: the next round starts from r1 again, not from r2
    assert second["gate"]["action"] == "rejected"
    assert next_model(second, gate, previous=first["model"]) == Registry(gate.registry).get("r1")["model_uri"]
    assert next_model(second, gate.model_copy(update={"enabled": False}), previous=base) == second["model"]
    empty = GateConfig(registry=str(Path(root).parent / "empty-registry"))
    assert next_model(second, empty, previous=base) == base  # nothing promoted yet: where the round started
