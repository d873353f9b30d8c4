"""experiments.toy_world --smoke: every arm trained from the toy world's SFT model and evaluated, end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIELDS = ("answer_accuracy", "n", "ci_low", "ci_high", "seeds", "delta_vs_sft", "delta_ci_low", "delta_ci_high")


def test_smoke_runs_every_arm_and_writes_the_results(tmp_path):
    out = tmp_path / "tw"
    proc = subprocess.run([sys.executable, "-m", "experiments.toy_world", "--out", str(out), "--smoke"], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = out / "results"
    data = json.loads((results / "toy_world.json").read_text())
    assert set(data["arms"]) == {"sft", "sft-continued", "dpo", "simpo", "leanpo", "leanpo-gate-on"}
    for name, arm in data["arms"].items():
        assert all(field in arm for field in FIELDS), name
        assert arm["n"] == 12 and arm["ci_low"] <= arm["answer_accuracy"] <= arm["ci_high"]
        assert arm["delta_ci_low"] <= arm["delta_vs_sft"] <= arm["delta_ci_high"]
        assert set(arm["per_type"]) <= {"colour", "count", "direction", "shape"} and arm["per_type"]
    assert data["arms"]["sft"]["delta_vs_sft"] == 0.0
    assert data["plan"]["seeds"] == [0] and data["plan"]["objectives"]["dpo"]["beta"] == 0.1
    gates = data["smoothing_gate_active_fraction"]
    assert gates["leanpo-gate-on"] == 1.0 and gates["leanpo"] <= 1.0  # d = +inf opens the gate on every pair
    assert data["pairs"]["train"]["pairs"] == 16 and data["pairs"]["train"]["kept"] > 0
    assert all(not math.isnan(v) for v in data["final_displacement"]["leanpo"].values())
    report = (results / "toy_world.md").read_text()
    assert "## Plan (fixed before training" in report and "| leanpo | 1 |" in report
    assert (results / "toy_world_displacement.png").stat().st_size > 0
    assert (results / "toy_world_accuracy.png").stat().st_size > 0


def test_rounds_report_the_gate_verdict_of_each_round(tmp_path):
    """The experiment's rounds table reads each round's verdict from the registry the pipeline's gate writes."""
    from types import SimpleNamespace

    from experiments.toy_world import _gate_verdicts
    from leanpo_core.registry import Registry

    run = SimpleNamespace(path=lambda *parts: str(tmp_path.joinpath(*parts)))
    assert _gate_verdicts(run) == {}
    registry = Registry(str(tmp_path / "rounds" / "registry"))
    for name in ("r0", "r1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        registry.register(name, str(tmp_path / name), reason="trained")
    registry.promote("production", "r0", "gate: +2 pp")
    registry.reject("r1", "gate: -1 pp", alias="production")
    assert _gate_verdicts(run) == {"r0": "promoted", "r1": "rejected: gate: -1 pp"}
