"""Prefect tasks of the evaluation gate (leanpo_core/gate.py): who is current, register + decide + record + announce.

The train flow evaluates the candidate against the model it started from. When the alias's current model is that
model (or the alias has none yet: then the starting model is the reference), the gate reuses that evaluation;
otherwise the flow evaluates the candidate against the current model on the same questions first.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.events import emit_event
from prefect.runtime import flow_run

from leanpo_core import io, schemas
from leanpo_core.gate import GateConfig, apply, decide, markdown
from leanpo_core.registry import Registry, _absolute
from tasks.common import RETRIES

MODEL_PROMOTED = "leanpo.model.promoted"


@task(name="current-model", **RETRIES)
def current_model(registry: str, alias: str) -> dict | None:
    """The alias's current model in the registry ({model_id, model_uri}), or None."""
    model = Registry(registry).current(alias)
    return {"model_id": model["model_id"], "model_uri": model["model_uri"]} if model else None


def same_model(uri: str, current: dict | None) -> bool:
    return current is not None and _absolute(uri).rstrip("/") == current["model_uri"].rstrip("/")


def _actor() -> str:
    name = flow_run.get_flow_name() or "flow"
    return f"prefect:{name}/{flow_run.get_name() or flow_run.get_id() or 'local'}"


@task(name="gate", **RETRIES)
def gate(config: GateConfig, registry: str, published: dict, comparison: dict, reference: str | None,
         current: dict | None, pairs: dict | None = None, config_hash: str | None = None) -> dict:
    """Register the published model, decide against `reference` (a model name in the `comparison` evaluation),
    promote or reject it in the registry, and emit `leanpo.model.promoted` on a promotion."""
    logger = get_run_logger()
    store = Registry(registry)
    model_id = published["run_id"]
    store.register(model_id, published["model"], base_model=published["base_model"],
                   objective=published["objective"], run_id=published["run_id"],
                   pairs_uri=pairs["uri"] if pairs else None, pairs_hash=pairs["content_hash"] if pairs else None,
                   config_hash=config_hash, steps=published["steps"], final_loss=published["final_loss"],
                   metrics_uri=published["metrics"], evaluation_uri=published["evaluation"],
                   reason="trained by the train flow", by=_actor())
    rows = io.read_table(comparison["uri"], schemas.EVALUATION).to_pylist()
    decision = decide(rows, comparison["model"], reference, config)
    result = apply(store, decision, model_id, config.alias, by=_actor())
    action = result["action"]
    record = {"model_id": model_id, "alias": config.alias, "registry": store.uri, "action": action,
              "promote": decision.promote, "reason": decision.reason,
              "current_before": current["model_id"] if current else None, "comparison": comparison["uri"],
              "markdown": markdown(decision, model_id, config.alias, current["model_id"] if current else None),
              "event": None}
    if action == "promoted":
        payload = {"model_id": model_id, "alias": config.alias, "registry": store.uri,
                   "model_uri": store.get(model_id)["model_uri"], "previous_model_id": record["current_before"],
                   "reason": decision.reason, "evaluation": comparison["uri"]}
        emit_event(event=MODEL_PROMOTED, resource={"prefect.resource.id": f"leanpo.model.{config.alias}",
                                                   "prefect.resource.name": model_id}, payload=payload)
        record["event"] = MODEL_PROMOTED
        logger.info(f"promoted {model_id} to {config.alias}; emitted {MODEL_PROMOTED}")
    else:
        logger.info(f"{model_id} for {config.alias}: {action} ({decision.reason})")
    return record


@task(name="export-current", **RETRIES)
def export_current(registry: str, alias: str, target: str | None, expected_model_id: str | None) -> dict:
    """Copy the alias's current model to the serving folder and point `current.json` at it (leanpo_core/export.py),
    with a markdown artifact saying what is served now."""
    from prefect.artifacts import create_markdown_artifact

    from leanpo_core.export import export_current as export

    result = export(registry, alias, target, expected_model_id)
    stale = (f"\n\nThe event named `{expected_model_id}`, which is no longer current: the current model was "
             f"exported instead." if result["stale_event"] else "")
    create_markdown_artifact(key=f"served-{alias}", description=f"what {alias} serves", markdown=(
        f"**{alias}** serves `{result['model_id']}` from `{result['path']}` (pointer `current.json`; "
        f"{'copied now' if result['copied'] else 'folder already there'}).\n\nPromoted {result['promoted_at']}: "
        f"{result['reason']}{stale}"))
    get_run_logger().info(f"{alias} serves {result['model_id']} from {result['path']}"
                          + (" (the event's model is no longer current)" if result["stale_event"] else ""))
    return result
