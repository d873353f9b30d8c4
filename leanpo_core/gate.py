"""The evaluation gate: promote a candidate model only when it is better than the alias's current model.

Both models are evaluated on the same questions (one `evaluation` table holding the candidate's rows and the
reference model's rows, as `leanpo_core.evaluate --model CANDIDATE --baseline CURRENT` writes it). The gate:

  primary metric   the candidate must beat the reference by MORE than `margin` (absolute; accuracies are shares,
                   so 0.01 is one percentage point). Default metric: the first of answer_accuracy, answer_f1,
                   preference_accuracy that both models have.
  significance     with `significant: true`, the primary metric's paired 95% interval (the answer_accuracy_change
                   row: a paired bootstrap over the same questions) must also lie above 0; without such a row the
                   candidate is rejected (the gate cannot show significance).
  guarded metrics  every other metric named in `tolerance` that both models have must not drop by more than its
                   tolerance (absolute). Metrics that only one model has are shown and not checked.

No reference at all (nothing evaluated to compare with) promotes, saying so. Every metric here is higher-is-better.
`decide` is pure (rows in, Decision out); `apply` records it in the registry: `promote` (with the comparison in the
event's details) or `reject` with the reason. Defaults: docs/operations.md section 9, "Evaluation gate".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from pydantic import Field

from leanpo_core.config import StageConfig
from leanpo_core.registry import DEFAULT_ALIAS, Registry

PRIMARY_ORDER = ("answer_accuracy", "answer_f1", "preference_accuracy")
# metric -> its paired-difference row: answer_accuracy_change, and <benchmark>_accuracy_change likewise
CHANGE_ROWS = {"answer_accuracy": "answer_accuracy_change"}


class GateConfig(StageConfig):
    """The evaluation gate of the train flow: when a trained model becomes the alias's current model."""

    enabled: bool = Field(True, description="Register the trained model and promote it only when it passes the "
                          "gate; false: neither register nor promote (the flow only trains and evaluates).")
    alias: str = Field(DEFAULT_ALIAS, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                       description="The registry alias (deployment) whose current model the candidate must beat.")
    registry: str | None = Field(None, description="The registry (folder or s3:// prefix); default: "
                                 "<root>/registry (the pipeline: its top root's registry).")
    primary: str | None = Field(None, min_length=1, description="The metric that must improve; default: the first "
                                "of answer_accuracy, answer_f1, preference_accuracy that both models have.")
    margin: float = Field(0.01, ge=0, le=1, description="How much better (absolute) the candidate must be on the "
                          "primary metric: strictly more than this (0.01 = one percentage point of accuracy).")
    significant: bool = Field(False, description="Also require the primary metric's paired 95% interval (over the "
                              "same questions) to lie above 0.")
    tolerance: dict[str, float] = Field(
        {"answer_accuracy": 0.02, "answer_f1": 0.02, "preference_accuracy": 0.02},
        description="Guarded metrics: how much (absolute) each other metric may drop before the candidate is "
                    "rejected. The primary metric is never guarded.")


@dataclass
class Decision:
    """The gate's verdict: promote or not, why, and the comparison table (one row per metric)."""

    promote: bool
    reason: str
    primary: str | None
    candidate: str
    reference: str | None
    rows: list[dict] = field(default_factory=list)  # metric, role, candidate, reference, delta, threshold, verdict

    def to_dict(self) -> dict:
        return asdict(self)


def results(rows: list[dict], model: str) -> dict[str, dict]:
    """{metric: row} of one model in evaluation rows."""
    return {r["metric"]: r for r in rows if r["model"] == model}


def _finite(row: dict | None) -> bool:
    return row is not None and row.get("value") is not None and math.isfinite(row["value"])


def _primary(config: GateConfig, mine: dict, theirs: dict) -> str | None:
    if config.primary:
        return config.primary
    return next((m for m in PRIMARY_ORDER if _finite(mine.get(m)) and _finite(theirs.get(m))), None)


def _fmt(value: float | None, points: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value * 100:+.1f} pp" if points else f"{value:.4f}"


def decide(rows: list[dict], candidate: str, reference: str | None, config: GateConfig = GateConfig()) -> Decision:
    """The gate's decision for `candidate` against `reference` (model names as in `rows`, one evaluation table's
    rows: model, metric, value, n, ci_low, ci_high). `reference` None: nothing to compare with, promote."""
    mine = results(rows, candidate)
    if not mine:
        return Decision(False, f"the evaluation has no results for the candidate {candidate}", None, candidate,
                        reference)
    if reference is None:
        return Decision(True, f"no current model for {config.alias!r}: the first candidate is promoted without a "
                        "comparison", None, candidate, None,
                        [{"metric": m, "role": "shown", "candidate": r["value"], "reference": None, "delta": None,
                          "threshold": None, "verdict": ""} for m, r in sorted(mine.items()) if _finite(r)])
    theirs = results(rows, reference)
    primary = _primary(config, mine, theirs)
    table: list[dict] = []
    failures: list[str] = []
    passed = None
    if primary is None or not (_finite(mine.get(primary)) and _finite(theirs.get(primary))):
        failures.append(f"primary metric {primary or '/'.join(PRIMARY_ORDER)} was not measured for both models")
    else:
        delta = mine[primary]["value"] - theirs[primary]["value"]
        passed = delta > config.margin
        row = {"metric": primary, "role": "primary", "candidate": mine[primary]["value"],
               "reference": theirs[primary]["value"], "delta": delta, "threshold": f"> +{config.margin:g}",
               "verdict": "pass" if passed else "fail", "n": mine[primary].get("n")}
        if not passed:
            failures.append(f"{primary} {_fmt(mine[primary]['value'])} vs {_fmt(theirs[primary]['value'])}: "
                            f"{delta:+.4f} is not above the margin +{config.margin:g}")
        change = mine.get(CHANGE_ROWS.get(primary, f"{primary}_change"))
        if change is not None:
            row["interval"] = [change.get("ci_low"), change.get("ci_high")]
        if config.significant:
            low = change.get("ci_low") if change else None
            if low is None or not math.isfinite(low):
                failures.append(f"significance required, but {primary} has no paired interval")
                row["verdict"] = "fail"
            elif low <= 0:
                failures.append(f"{primary} change {_fmt(change['value'], True)} is not significant: its paired "
                                f"95% interval [{_fmt(low, True)}, {_fmt(change.get('ci_high'), True)}] reaches 0")
                row["verdict"] = "fail"
        table.append(row)
    for metric, tolerance in sorted(config.tolerance.items()):
        if metric == primary:
            continue
        if not (_finite(mine.get(metric)) and _finite(theirs.get(metric))):
            continue
        delta = mine[metric]["value"] - theirs[metric]["value"]
        ok = delta >= -tolerance
        table.append({"metric": metric, "role": "guarded", "candidate": mine[metric]["value"],
                      "reference": theirs[metric]["value"], "delta": delta, "threshold": f">= -{tolerance:g}",
                      "verdict": "pass" if ok else "fail", "n": mine[metric].get("n")})
        if not ok:
            failures.append(f"{metric} drops {delta:+.4f}, beyond the tolerance -{tolerance:g}")
    for metric in sorted(set(mine) & set(theirs)):
        if metric != primary and metric not in config.tolerance and _finite(mine[metric]) and _finite(theirs[metric]):
            table.append({"metric": metric, "role": "shown", "candidate": mine[metric]["value"],
                          "reference": theirs[metric]["value"],
                          "delta": mine[metric]["value"] - theirs[metric]["value"], "threshold": None,
                          "verdict": "", "n": mine[metric].get("n")})
    if failures:
        return Decision(False, "; ".join(failures), primary, candidate, reference, table)
    delta = table[0]["delta"]
    return Decision(True, f"{primary} {delta:+.4f} above the margin +{config.margin:g} over {reference}"
                    + ("" if len(table) == 1 else ", no guarded metric beyond its tolerance"),
                    primary, candidate, reference, table)


def markdown(decision: Decision, model_id: str, alias: str, current_id: str | None) -> str:
    """The comparison table and the decision, for the run's report."""
    verdict = "**promoted**" if decision.promote else "**rejected**"
    lines = [f"Candidate `{model_id}` vs {f'current `{current_id}`' if current_id else 'no current model'} "
             f"(reference `{decision.reference}`) for alias `{alias}`: {verdict}.", "",
             f"Reason: {decision.reason}", ""]
    if decision.rows:
        lines += ["| metric | role | candidate | reference | change | threshold | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for r in decision.rows:
            change = _fmt(r["delta"]) if r["delta"] is None else f"{r['delta']:+.4f}"
            if r.get("interval") and None not in r["interval"]:
                change += f" [{r['interval'][0]:+.4f}, {r['interval'][1]:+.4f}]"
            lines.append(f"| {r['metric']} | {r['role']} | {_fmt(r['candidate'])} | {_fmt(r['reference'])} | "
                         f"{change} | {r['threshold'] or ''} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def apply(registry: Registry, decision: Decision, model_id: str, alias: str, by: str | None = None) -> dict:
    """Record the decision: promote `model_id` to `alias`, or reject it (for `alias`) with the reason. A model that
    already has its verdict for the alias (a retried task) is left as it is. Returns {action, event}."""
    model = registry.get(model_id)
    if alias in model["aliases"]:
        return {"action": "already-current", "event": None}
    if model["rejected"]:
        return {"action": "already-rejected", "event": None}
    details = {"gate": decision.to_dict()}
    if decision.promote:
        return {"action": "promoted", "event": registry.promote(alias, model_id, f"gate: {decision.reason}", by,
                                                                details)}
    return {"action": "rejected", "event": registry.reject(model_id, f"gate: {decision.reason}", by, alias,
                                                           details)}
