"""Export: the alias's current (promoted) model into a serving folder, with a pointer written last.

    leanpo run export --config export.yaml     # registry: runs/nightly/registry, alias: production, target: ...

The `export-on-promotion` deployment (prefect.yaml, `leanpo serve`) runs this flow on every `leanpo.model.promoted`
event, with the registry, alias and model id of the event; a serving process reads `<target>/current.json`
(leanpo_core/export.py says what it holds). The registry, not the event, decides what is exported.
"""

from __future__ import annotations

from prefect import flow

from leanpo_core.registry import DEFAULT_ALIAS
from tasks import gate as gate_tasks


@flow(name="export", log_prints=True)
def export_flow(registry: str, alias: str = DEFAULT_ALIAS, target: str | None = None,
                model_id: str | None = None) -> dict:
    """Copy `alias`'s current model in `registry` to `target` (default `<registry>/serving/<alias>`) and point
    `<target>/current.json` at it. `model_id`: the model the triggering event promoted (the result says when it is
    no longer current)."""
    return gate_tasks.export_current(registry, alias, target, model_id)
