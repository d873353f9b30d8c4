"""Markdown report artifacts, one per flow run: what a data refresh produced, what a training run learned.

Reports read the tables the stages wrote (never data passed between tasks) and summarise them: counts, failure
reasons, score distributions, the training curve (embedded PNG) and the evaluation against the baseline.
"""

from __future__ import annotations

import base64
import collections
import math
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from leanpo_core import io, schemas
from leanpo_core.layout import RunLayout


def _stats(values: list[float]) -> str:
    finite = sorted(v for v in values if v is not None and math.isfinite(v))
    if not finite:
        return "n/a"
    mid = finite[len(finite) // 2]
    return f"min {finite[0]:.3f} · median {mid:.3f} · max {finite[-1]:.3f} (n={len(finite)})"


def failures(root: str) -> list[dict]:
    """Every failure row the stages of the run at `root` recorded."""
    rows = []
    for uri in io.list_uris(io.join_uri(root, "failures")):
        if uri.endswith(".parquet"):
            rows += io.read_table(uri, schemas.FAILURES).select(["stage", "error_type", "message"]).to_pylist()
    return rows


def refresh_markdown(root: str, outputs: dict, announced: bool) -> str:
    """The data refresh's report: table counts, failure reasons, pair decisions, score distributions."""
    lines = [f"# Data refresh of `{root}`", "", "| table | rows | location |", "|---|---|---|"]
    for name in ("videos", "frames", "samples", "scored", "pairs"):
        lines.append(f"| {name} | {outputs[name]['rows']} | `{outputs[name]['uri']}` |")
    failed = failures(root)
    lines += ["", f"## Failures ({len(failed)})", ""]
    by_reason = collections.Counter((f["stage"], f["error_type"]) for f in failed)
    if by_reason:
        lines += ["| stage | error | count |", "|---|---|---|"]
        lines += [f"| {stage} | {error} | {n} |" for (stage, error), n in by_reason.most_common()]
    pairs = io.read_table(outputs["pairs"]["uri"], schemas.PAIRS).to_pylist()
    kept = [p for p in pairs if p["kept"]]
    reasons = collections.Counter(p["drop_reason"] for p in pairs if not p["kept"])
    lines += ["", f"## Pairs: {len(kept)} kept of {len(pairs)}", ""]
    lines += [f"- dropped as `{reason}`: {n}" for reason, n in reasons.most_common()]
    scored = io.read_dataset(RunLayout(root).scored, schemas.SCORED).to_pylist()
    judged = collections.Counter(s["judge_status"] for s in scored)
    lines += ["", "## Score distributions", "", "| quantity | distribution |", "|---|---|"]
    for side in ("win", "lose"):
        mine = [s for s in scored if s["side"] == side]
        lines.append(f"| score ({side} side) | {_stats([s['score'] for s in mine])} |")
        lines.append(f"| prior F1 ({side} side) | {_stats([s['prior_f1'] for s in mine])} |")
        lines.append(f"| SFT mean log-prob ({side} side) | {_stats([s['sft_mean_logprob'] for s in mine])} |")
    lines.append("| trust gap rbar(chosen) - rbar(rejected), all pairs | "
                 + _stats([p["chosen_sft_logp"] - p["rejected_sft_logp"] for p in pairs
                           if p["chosen_sft_logp"] is not None and p["rejected_sft_logp"] is not None]) + " |")
    lines += ["", "Judge replies: " + ", ".join(f"{k} {v}" for k, v in sorted(judged.items())), ""]
    lines.append("Event `leanpo.pairs.published` emitted." if announced
                 else "Pairs unchanged (cached): no event emitted.")
    return "\n".join(lines)


@task(name="refresh-report")
def refresh_report(root: str, outputs: dict, announced: bool) -> str:
    """Markdown report artifact of one data refresh."""
    text = refresh_markdown(root, outputs, announced)
    create_markdown_artifact(text, key="data-refresh-report", description=f"Data refresh of {root}")
    return text


def train_markdown(trained: dict, evaluation: dict | None, published: dict, gated: dict | None = None) -> str:
    """The training run's report: steps and loss, the curve (embedded), the evaluation against the baseline, the
    evaluation gate's comparison and decision."""
    lines = [f"# Training `{trained['run_id']}` ({trained['objective']})", "",
             f"- base model: `{trained['base_model']}`", f"- steps: {trained['steps']}, final loss: "
             f"{trained['final_loss'] if trained['final_loss'] is None else round(trained['final_loss'], 4)}",
             f"- model: `{published['model']}`", f"- metrics table: `{published['metrics']}`",
             f"- plot: `{published['plot']}`", f"- record: `{published['record']}`", ""]
    plot = Path(trained["plot"])
    if plot.exists():
        encoded = base64.b64encode(plot.read_bytes()).decode()
        lines += ["## Training curve", "", f"![chosen/rejected mean log-probs and margin](data:image/png;base64,"
                  f"{encoded})", ""]
    if evaluation:
        report = evaluation["report"]
        lines += ["## Evaluation", "", io_text(report).replace("# Evaluation", "### Evaluation", 1)]
    if gated:
        lines += ["", "## Evaluation gate", "", gated["markdown"], f"Registry: `{gated['registry']}`; action: "
                  f"`{gated['action']}`" + (f"; event `{gated['event']}` emitted." if gated["event"] else ".")]
    return "\n".join(lines)


def io_text(uri: str) -> str:
    return io.read_bytes(uri).decode()


@task(name="train-report")
def train_report(trained: dict, evaluation: dict | None, published: dict, gated: dict | None = None) -> str:
    """Markdown report artifact of one training run."""
    text = train_markdown(trained, evaluation, published, gated)
    create_markdown_artifact(text, key="train-report", description=f"Training run {trained['run_id']}")
    return text


@task(name="pipeline-report")
def pipeline_report(root: str, rounds: list[dict]) -> str:
    """Markdown report artifact of the whole pipeline: pairs, training and evaluation per round."""
    lines = [f"# Pipeline `{root}`: {len(rounds)} round(s)", "",
             "| round | generator | pairs kept / all | trained model | steps | final loss |",
             "|---|---|---|---|---|---|"]
    for index, done in enumerate(rounds):
        pairs = io.read_table(done["refresh"]["pairs"]["uri"], schemas.PAIRS).select(["kept"]).column("kept")
        kept = sum(pairs.to_pylist())
        train = done["train"]
        lines.append(f"| {index} | `{done['generator']}` | {kept} / {len(pairs)} | `{train['model']}` | "
                     f"{train['steps']} | {train['final_loss']} |")
    gates = [(index, done["train"]["gate"]) for index, done in enumerate(rounds) if done["train"].get("gate")]
    if gates:
        lines += ["", "## Evaluation gate", "", "| round | model | alias | action | reason |", "|---|---|---|---|---|"]
        lines += [f"| {index} | `{g['model_id']}` | {g['alias']} | {g['action']} | {g['reason']} |"
                  for index, g in gates]
    for index, done in enumerate(rounds):
        evaluation = done["train"].get("evaluation")
        if evaluation:
            lines += ["", f"## Round {index} evaluation", "",
                      io_text(evaluation["report"]).replace("# Evaluation", "### Evaluation", 1)]
    text = "\n".join(lines)
    create_markdown_artifact(text, key="pipeline-report", description=f"Pipeline run under {root}")
    return text
