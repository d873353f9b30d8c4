"""Export the promoted model to a serving folder: what a serving process (vLLM, a model server) reads.

    python -m leanpo_core.export --registry runs/nightly/registry --alias production --target /srv/models/leanpo
    leanpo run export --config export.yaml      # the flow; the export-on-promotion deployment runs it on every
                                                # `leanpo.model.promoted` event (prefect.yaml, `leanpo serve`)

The alias's current model in the registry (leanpo_core/registry.py) is copied, as registered, to
`<target>/<model_id>/`; then `<target>/current.json` is written, the last write (atomic locally, one PUT on S3), so
a reader that follows the pointer never finds a half-copied model:

    {"model_id": ..., "alias": ..., "path": "<target>/<model_id>", "registry": ..., "model_uri": ...,
     "promoted_at": ..., "reason": ..., "exported_at": ...}

The registry decides what is exported, not the event: when the model an event names is no longer current (a
rollback or a later promotion came first), the current one is exported and the result says so. A model folder
already in the target is not copied again. target defaults to `<registry>/serving/<alias>`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json

from leanpo_core import io
from leanpo_core.registry import DEFAULT_ALIAS, Registry, RegistryError

POINTER = "current.json"


def default_target(registry: str, alias: str) -> str:
    return io.join_uri(Registry(registry).uri, "serving", alias)


def read_pointer(target: str, options: io.StorageOptions | None = None) -> dict | None:
    """`<target>/current.json`, or None when nothing was exported there yet."""
    try:
        return json.loads(io.read_bytes(io.join_uri(target, POINTER), options))
    except FileNotFoundError:
        return None


def export_current(registry: str, alias: str = DEFAULT_ALIAS, target: str | None = None,
                   expected_model_id: str | None = None, options: io.StorageOptions | None = None) -> dict:
    """Copy the alias's current model to `target` and point `<target>/current.json` at it; the pointer's content
    plus `copied` (whether the folder was copied now), `stale_event` (the expected model was no longer current)
    and `unchanged` (the pointer already named this model). RegistryError when the alias has no current model."""
    store = Registry(registry, options)
    state = store.state()
    model_id = state.current.get(alias)
    if model_id is None:
        raise RegistryError(f"alias {alias!r} has no current model in the registry at {store.uri}: nothing to export")
    model = state.models[model_id]
    promotion = next(e for e in reversed(state.events) if e["alias"] == alias and e["model_id"] == model_id
                     and e["event"] in ("promoted", "rolled_back"))
    target = (target or default_target(registry, alias)).rstrip("/")
    folder = io.join_uri(target, model_id)
    before = read_pointer(target, options)
    copied = not io.exists(io.join_uri(folder, "config.json"), options)
    if copied:
        io.copy_folder(model["model_uri"], folder, options)
    pointer = {"model_id": model_id, "alias": alias, "path": folder, "registry": store.uri,
               "model_uri": model["model_uri"], "promoted_at": promotion["created_at"].isoformat(),
               "reason": promotion["reason"], "exported_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    io.write_bytes(io.join_uri(target, POINTER), json.dumps(pointer, indent=2).encode(), options)
    return {**pointer, "copied": copied, "unchanged": bool(before and before["model_id"] == model_id),
            "stale_event": bool(expected_model_id and expected_model_id != model_id),
            "expected_model_id": expected_model_id}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m leanpo_core.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", required=True, help="the registry (folder or s3:// prefix)")
    parser.add_argument("--alias", default=DEFAULT_ALIAS, help=f"whose current model (default {DEFAULT_ALIAS})")
    parser.add_argument("--target", help="serving folder or s3:// prefix (default: <registry>/serving/<alias>)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = export_current(args.registry, args.alias, args.target)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['alias']}: {result['model_id']} -> {result['path']} "
              f"({'copied' if result['copied'] else 'already there'}; pointer {result['path'].rsplit('/', 1)[0]}/"
              f"{POINTER})")
    return result


if __name__ == "__main__":
    from leanpo_core.launch import stage_entry

    stage_entry(main, hard_exit=True)  # its writes are committed when main returns
