"""leanpo_core.gate: the evaluation gate's decision on hand-worked evaluation rows, and its record in the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leanpo_core.gate import GateConfig, apply, decide, markdown
from leanpo_core.registry import Registry

CAND, CUR = "/runs/r2/model", "/models/current"


def rows(candidate: dict, reference: dict, change: tuple | None = None) -> list[dict]:
    """Evaluation rows: {metric: value} per model; `change` = (delta, ci_low, ci_high) of answer_accuracy."""
    out = [{"model": m, "metric": k, "value": v, "n": 100, "ci_low": None, "ci_high": None}
           for m, values in ((CAND, candidate), (CUR, reference)) for k, v in values.items()]
    if change:
        out.append({"model": CAND, "metric": "answer_accuracy_change", "value": change[0], "n": 100,
                    "ci_low": change[1], "ci_high": change[2]})
    return out


def test_better_by_more_than_the_margin_is_promoted():
    # 0.72 - 0.70 = +0.02 > margin 0.01; answer_f1 -0.01 within its tolerance 0.02
    d = decide(rows({"answer_accuracy": 0.72, "answer_f1": 0.50, "answer_logp": -1.0},
                    {"answer_accuracy": 0.70, "answer_f1": 0.51, "answer_logp": -0.9}), CAND, CUR)
    assert d.promote and d.primary == "answer_accuracy"
    assert "above the margin +0.01" in d.reason
    by_metric = {r["metric"]: r for r in d.rows}
    assert by_metric["answer_accuracy"]["role"] == "primary" and by_metric["answer_accuracy"]["verdict"] == "pass"
    assert by_metric["answer_accuracy"]["delta"] == pytest.approx(0.02)
    assert by_metric["answer_f1"]["role"] == "guarded" and by_metric["answer_f1"]["verdict"] == "pass"
    assert by_metric["answer_logp"]["role"] == "shown"  # not guarded by default: shown, never decisive


def test_better_by_less_than_the_margin_is_rejected_naming_the_margin():
    d = decide(rows({"answer_accuracy": 0.705}, {"answer_accuracy": 0.70}), CAND, CUR)  # +0.005 <= 0.01
    assert not d.promote and "not above the margin +0.01" in d.reason
    assert d.rows[0]["verdict"] == "fail"
    assert decide(rows({"answer_accuracy": 0.705}, {"answer_accuracy": 0.70}), CAND, CUR,
                  GateConfig(margin=0.0)).promote  # margin 0: any gain


def test_equal_is_not_better():
    assert not decide(rows({"answer_accuracy": 0.7}, {"answer_accuracy": 0.7}), CAND, CUR, GateConfig(margin=0)).promote


def test_better_on_primary_but_worse_beyond_tolerance_elsewhere_is_rejected_naming_that_metric():
    d = decide(rows({"answer_accuracy": 0.80, "preference_accuracy": 0.60},
                    {"answer_accuracy": 0.70, "preference_accuracy": 0.65}), CAND, CUR)  # -0.05 < -0.02
    assert not d.promote
    assert "preference_accuracy drops -0.0500, beyond the tolerance -0.02" in d.reason
    assert "answer_accuracy" not in d.reason.split("preference_accuracy")[0]  # the primary passed
    loose = GateConfig(tolerance={"preference_accuracy": 0.1})
    assert decide(rows({"answer_accuracy": 0.80, "preference_accuracy": 0.60},
                       {"answer_accuracy": 0.70, "preference_accuracy": 0.65}), CAND, CUR, loose).promote


def test_no_current_model_promotes_and_says_why():
    d = decide(rows({"answer_accuracy": 0.5, "answer_f1": float("nan")}, {}), CAND, None)
    assert d.promote and "no current model" in d.reason and "first candidate" in d.reason
    assert [r["metric"] for r in d.rows] == ["answer_accuracy"]  # NaN (not measured) left out


def test_primary_metric_defaults_and_missing_primary_rejects():
    # No exact-answer questions: answer_f1 is the primary metric.
    d = decide(rows({"answer_f1": 0.60, "answer_accuracy": float("nan")},
                    {"answer_f1": 0.55, "answer_accuracy": float("nan")}), CAND, CUR)
    assert d.promote and d.primary == "answer_f1"
    d = decide(rows({"answer_f1": 0.6}, {"answer_f1": 0.5}), CAND, CUR, GateConfig(primary="answer_accuracy"))
    assert not d.promote and "primary metric answer_accuracy was not measured for both models" in d.reason
    assert not decide(rows({}, {"answer_f1": 0.5}), CAND, CUR).promote  # no candidate rows at all


def test_significance_uses_the_paired_interval():
    better = rows({"answer_accuracy": 0.75}, {"answer_accuracy": 0.70}, change=(0.05, -0.01, 0.11))
    assert decide(better, CAND, CUR).promote  # by default the margin alone decides
    d = decide(better, CAND, CUR, GateConfig(significant=True))
    assert not d.promote and "not significant" in d.reason and "-1.0 pp" in d.reason
    significant = rows({"answer_accuracy": 0.75}, {"answer_accuracy": 0.70}, change=(0.05, 0.02, 0.08))
    assert decide(significant, CAND, CUR, GateConfig(significant=True)).promote
    unpaired = rows({"answer_accuracy": 0.75}, {"answer_accuracy": 0.70})
    assert "no paired interval" in decide(unpaired, CAND, CUR, GateConfig(significant=True)).reason
    # a benchmark as the primary metric: its own change row (evaluate writes <name>_accuracy_change)
    bench = [{**r, "metric": r["metric"].replace("answer_accuracy", "videomme_accuracy")} for r in significant]
    gated = decide(bench, CAND, CUR, GateConfig(significant=True, primary="videomme_accuracy"))
    assert gated.promote, gated.reason
    bench = [{**r, "metric": r["metric"].replace("answer_accuracy", "videomme_accuracy")} for r in better]
    assert not decide(bench, CAND, CUR, GateConfig(significant=True, primary="videomme_accuracy")).promote


def test_markdown_shows_the_table_and_the_decision():
    d = decide(rows({"answer_accuracy": 0.72}, {"answer_accuracy": 0.70}, change=(0.02, -0.03, 0.07)), CAND, CUR)
    text = markdown(d, "r2", "production", "r1")
    assert "**promoted**" in text and "current `r1`" in text
    assert "| answer_accuracy | primary | 0.7200 | 0.7000 | +0.0200 [-0.0300, +0.0700] | > +0.01 | pass |" in text


def _model(where: Path, name: str) -> str:
    folder = where / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return str(folder)


def test_apply_promotes_a_better_candidate_and_rejects_a_worse_one(tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    registry.register("r1", _model(tmp_path, "r1"))
    registry.register("r2", _model(tmp_path, "r2"))
    registry.register("r3", _model(tmp_path, "r3"))
    first = decide(rows({"answer_accuracy": 0.7}, {}), CAND, None)
    assert apply(registry, first, "r1", "production")["action"] == "promoted"
    better = decide(rows({"answer_accuracy": 0.75}, {"answer_accuracy": 0.70}), CAND, CUR)
    result = apply(registry, better, "r2", "production", by="flow-run/x")
    assert result["action"] == "promoted" and result["event"]["previous_model_id"] == "r1"
    assert registry.current("production")["model_id"] == "r2"
    assert apply(registry, better, "r2", "production")["action"] == "already-current"  # a retried task
    worse = decide(rows({"answer_accuracy": 0.60}, {"answer_accuracy": 0.75}), CAND, CUR)
    assert apply(registry, worse, "r3", "production")["action"] == "rejected"
    assert registry.current("production")["model_id"] == "r2"  # unchanged
    r3 = registry.get("r3")
    assert r3["status"] == "rejected" and r3["rejected"]["reason"].startswith("gate: answer_accuracy 0.6000 vs")
    event = registry.history(model_id="r3")[-1]
    assert event["event"] == "rejected" and event["alias"] == "production"
    gate = json.loads(event["details"])["gate"]
    assert gate["promote"] is False and gate["rows"][0]["metric"] == "answer_accuracy"
    assert apply(registry, worse, "r3", "production")["action"] == "already-rejected"
