"""The model registry: every trained model with its lineage, a `current` model per alias, every decision a row.

    leanpo models list|show|history|current|register|promote|reject|rollback ...    # leanpo_core/registry_cli.py

The registry lives at a local folder or an s3:// prefix (by default a run root's `<root>/registry`).

Layout, one table kind (`schemas.REGISTRY`), append-only:

    <registry>/events/<created_at>-<event_id>.parquet   one row, one immutable object per event (+ its manifest)
    <registry>/models/<model_id>/...                    model folders the registry owns (`register(copy=True)`)

Events: `registered` (the model and its lineage: folder, base model, pairs table URI and sha256, config hash,
round, training steps and final loss, evaluation results), `evaluated` (results attached later), `promoted` (the
model becomes the alias's current one), `rejected` (a candidate refused, with its reason; the alias's current model
is not touched), `rolled_back` (the alias goes back to the model it had before its latest promotion). Each row says
who (`created_by`: user@host unless given, e.g. a flow run), when and why (`reason`, required for promote, reject
and rollback). Nothing is ever rewritten or deleted.

State is derived, never stored: events are read in (created_at, event_id) order and replayed. Per alias a stack of
models: a promotion pushes, a rollback pops back to the model it names (its `model_id`); `current` is the top.
A model's status is `current` (for some alias), `rejected`, or `registered`.

Atomicity: a promotion or rollback is exactly one new object, written by `io.write_table` (locally: a hidden
temporary file, fsync, `os.replace`; on S3: one PUT, visible only once complete). Since no object is ever
modified, a reader lists the events and sees each whole or not at all, so the registry it derives is the one
before the event or the one after it, never one between, whatever moment the writer is SIGKILLed (tested: a child
killed while the event's bytes are written but not published, after they are published and before the manifest,
a PUT cut off after half its body on a real S3 server, and at random moments of a loop of promotions). Two
writers never write the same object (fresh event ids), so nothing is lost to a concurrent writer; a concurrent
promotion and rollback of one alias are both recorded and the later event key decides (each writer stamps its
event after the newest one it has seen, so one writer's events stay in order even if its clock steps back).
Checks (the model exists, is not rejected, is not already current) read the log before the write; two writers
racing on one alias are not serialised beyond that: run one gate per alias (the `retrain` deployment runs one
flow run at a time).

Rules (RegistryError, a BadInput: exit 65, one line): ids and aliases are `[A-Za-z0-9][A-Za-z0-9._-]*` (up to 128);
registering an id again is a no-op when it names the same folder (a retried task), refused otherwise; a model
folder that does not exist is refused; promoting an unknown, a rejected or the already-current model is refused (a
rejected model stays rejected: register the folder again under a new id to try it again); rejecting a model that
is current for some alias is refused (roll back first); rolling back an alias with no earlier model is refused;
rollback skips earlier models that were rejected since. An unreachable store is a StorageError naming the URI and
endpoint (exit 1: retry later), never a half-written registry.

Reading costs one listing and one GET per event (fetched concurrently on S3): fine for the nightly cadence
(hundreds of events a year); a snapshot-and-compact step is the way on if it ever grows to tens of thousands.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import re
import secrets
import socket
from dataclasses import dataclass, field
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from leanpo_core import io, schemas
from leanpo_core.launch import BadInput

DEFAULT_ALIAS = "production"
EVENTS = ("registered", "evaluated", "promoted", "rejected", "rolled_back")
LINEAGE = ("model_uri", "base_model", "objective", "run_id", "pairs_uri", "pairs_hash", "config_hash", "round",
           "steps", "final_loss", "metrics_uri", "evaluation_uri")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Shown first in the list's evaluation column, whichever the evaluation has.
HEADLINE_METRICS = ("answer_accuracy", "answer_accuracy_change", "preference_accuracy", "answer_f1", "answer_logp")


class RegistryError(BadInput):
    """A registry request refused as given: unknown model, rejected model, nothing to roll back to, a bad name."""


def default_actor() -> str:
    """Who acts, when nobody says: `user@host`."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers) and no LOGNAME/USER
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise RegistryError(f"invalid {kind} {value!r}: use letters, digits, '.', '_' and '-' (up to 128, starting "
                            f"with a letter or digit)")
    return value


def _absolute(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def table_hash(uri: str, options: io.StorageOptions | None = None) -> str:
    """The content hash of a stored table: its manifest's sha256 (of the Parquet bytes), else the bytes' own;
    for a sharded table (a folder of part-*.parquet), `io.dataset_manifest`'s hash over its shards."""
    import hashlib

    try:
        return io.read_manifest(uri, options).content_hash
    except FileNotFoundError:
        pass
    if shards := io.shard_uris(uri, options):
        spec = io.read_any(next(iter(shards.values())), options)[1]
        if spec is None:
            raise RegistryError(f"{uri}: its shards are not leanpo tables")
        return io.dataset_manifest(uri, spec, options).content_hash
    try:
        return hashlib.sha256(io.read_bytes(uri, options)).hexdigest()
    except FileNotFoundError as exc:
        raise RegistryError(f"no table at {uri}") from exc


def training_summary(metrics_uri: str, options: io.StorageOptions | None = None) -> dict:
    """{steps, final_loss} from a training run's `train_metrics` table (its last row)."""
    rows = io.read_table(metrics_uri, schemas.TRAIN_METRICS, options).select(["step", "loss"]).to_pylist()
    last = rows[-1] if rows else {}
    return {"steps": last.get("step"), "final_loss": last.get("loss")}


def evaluation_results(evaluation_uri: str, model: str | None = None,
                       options: io.StorageOptions | None = None) -> dict[str, dict]:
    """{metric: {value, n, ci_low, ci_high, split}} of one model in an `evaluation` table; `model` defaults to the
    evaluated model (the table's first rows; the baseline's follow)."""
    rows = io.read_table(evaluation_uri, schemas.EVALUATION, options).to_pylist()
    if not rows:
        return {}
    model = model or rows[0]["model"]
    found = {r["metric"]: {"value": r["value"], "n": r["n"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                           "split": r["split"]} for r in rows if r["model"] == model}
    if not found:
        raise RegistryError(f"{evaluation_uri} has no rows for model {model!r}")
    return found


def _jsonable(row: dict) -> dict:
    return {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in row.items()}


@dataclass
class State:
    """The registry as the events say: every model (lineage, evaluation, status), each alias's current model."""

    events: list[dict]
    models: dict[str, dict] = field(default_factory=dict)
    stacks: dict[str, list[str]] = field(default_factory=dict)  # alias -> models promoted and not rolled back

    @property
    def current(self) -> dict[str, str]:
        return {alias: stack[-1] for alias, stack in sorted(self.stacks.items()) if stack}

    def aliases_of(self, model_id: str) -> list[str]:
        return [alias for alias, current in self.current.items() if current == model_id]


def replay(events: Iterable[dict]) -> State:
    """The state after `events` (in order); events about unknown models (none are written so) are kept in the
    history and ignored here."""
    state = State(events=list(events))
    for event in state.events:
        kind, model_id, alias = event["event"], event["model_id"], event["alias"]
        if kind == "registered":
            if model_id not in state.models:  # a concurrent duplicate registration: the first one counts
                state.models[model_id] = {
                    "model_id": model_id, **{k: event[k] for k in LINEAGE},
                    "evaluation": json.loads(event["evaluation"]) if event["evaluation"] else {},
                    "details": json.loads(event["details"]) if event["details"] else {},
                    "registered_at": event["created_at"], "registered_by": event["created_by"],
                    "reason": event["reason"], "rejected": None}
        elif model_id not in state.models:
            continue
        elif kind == "evaluated":
            state.models[model_id].update(evaluation=json.loads(event["evaluation"] or "{}"),
                                          evaluation_uri=event["evaluation_uri"])
        elif kind == "rejected":
            state.models[model_id]["rejected"] = {"reason": event["reason"], "at": event["created_at"],
                                                  "by": event["created_by"], "alias": alias}
        elif kind == "promoted":
            state.stacks.setdefault(alias, []).append(model_id)
        elif kind == "rolled_back":
            stack = state.stacks.setdefault(alias, [])
            if stack:
                stack.pop()
            while stack and stack[-1] != model_id:
                stack.pop()
            if not stack:
                stack.append(model_id)
    for model_id, model in state.models.items():
        aliases = state.aliases_of(model_id)
        model["aliases"] = aliases
        model["status"] = "current" if aliases else "rejected" if model["rejected"] else "registered"
    return state


class Registry:
    """The registry at `uri` (a local folder or an s3:// prefix). Every call reads the log afresh."""

    def __init__(self, uri: str, options: io.StorageOptions | None = None):
        self.uri = _absolute(uri).rstrip("/")
        self.options = options

    @property
    def events_uri(self) -> str:
        return io.join_uri(self.uri, "events")

    def model_folder(self, model_id: str) -> str:
        return io.join_uri(self.uri, "models", _check_name("model id", model_id))

    # -- reading ---------------------------------------------------------------------------------------------------

    def events(self) -> list[dict]:
        """Every event, oldest first. An event object that cannot be read as a registry row is an error naming it
        (it cannot come from this module's writes)."""
        uris = [u for u in io.list_uris(self.events_uri, self.options) if u.endswith(".parquet")]
        if not uris:
            return []
        fs, _ = io.filesystem(self.events_uri, self.options)
        paths = {io.filesystem(u, self.options)[1]: u for u in uris}
        with io.storage_errors("read", self.events_uri, self.options, missing_ok=False):
            blobs = fs.cat(list(paths))  # one GET per event, concurrent on S3
        tables = []
        for path, uri in paths.items():
            try:
                table = pq.read_table(pa.BufferReader(blobs[path]))
            except (pa.ArrowInvalid, OSError) as exc:
                raise RegistryError(f"registry event {uri} is not a readable Parquet object: {exc}") from exc
            tables.append(schemas.check_version(table, schemas.REGISTRY))
        rows = pa.concat_tables(tables).to_pylist()
        return sorted(rows, key=lambda r: (r["created_at"], r["event_id"]))

    def state(self) -> State:
        return replay(self.events())

    def models(self) -> list[dict]:
        """Every registered model, oldest first, with `status` and `aliases`."""
        return list(self.state().models.values())

    def get(self, model_id: str, state: State | None = None) -> dict:
        state = state or self.state()
        if model_id not in state.models:
            known = ", ".join(list(state.models)[-5:]) or "none"
            raise RegistryError(f"no model {model_id!r} in the registry at {self.uri} (latest: {known})")
        return state.models[model_id]

    def current(self, alias: str = DEFAULT_ALIAS) -> dict | None:
        """The alias's current model, or None when nothing was promoted to it (or every promotion rolled back)."""
        state = self.state()
        model_id = state.current.get(_check_name("alias", alias))
        return state.models[model_id] if model_id else None

    def history(self, alias: str | None = None, model_id: str | None = None) -> list[dict]:
        """The events, oldest first; only those of `alias` and/or about `model_id` when given."""
        return [e for e in self.events() if (alias is None or e["alias"] == alias)
                and (model_id is None or model_id in (e["model_id"], e["previous_model_id"]))]

    # -- writing ---------------------------------------------------------------------------------------------------

    def _append(self, state: State, row: dict) -> dict:
        """Write one event as one new object; its key sorts after every event in `state`."""
        created = _now()
        if state.events and created <= state.events[-1]["created_at"]:
            created = state.events[-1]["created_at"] + dt.timedelta(microseconds=1)
        row = {**row, "event_id": secrets.token_hex(8), "created_at": created,
               "created_by": row.get("created_by") or default_actor()}
        name = f"{created.strftime('%Y%m%dT%H%M%S%fZ')}-{row['event_id']}.parquet"
        io.write_table([row], io.join_uri(self.events_uri, name), schemas.REGISTRY, self.options)
        return row

    def register(self, model_id: str, model_uri: str, *, base_model: str | None = None,
                 objective: str | None = None, run_id: str | None = None, pairs_uri: str | None = None,
                 pairs_hash: str | None = None, config_hash: str | None = None, round: int | None = None,
                 steps: int | None = None, final_loss: float | None = None, metrics_uri: str | None = None,
                 evaluation: dict | None = None, evaluation_uri: str | None = None, reason: str | None = None,
                 by: str | None = None, copy: bool = False, details: dict | None = None) -> dict:
        """Record a trained model and its lineage; returns the model's record.

        Missing pieces are read where they are: the pairs table's content hash from its manifest, steps and final
        loss from `metrics_uri` (a train_metrics table), results from `evaluation_uri` (an evaluation table).
        `copy`: copy the folder to `<registry>/models/<model_id>` first, so that the registry owns it. Registering
        the same id and folder again returns the existing record and writes nothing (a retried task).
        """
        _check_name("model id", model_id)
        source = _absolute(model_uri)
        stored = self.model_folder(model_id) if copy else source
        state = self.state()
        if model_id in state.models:
            existing = state.models[model_id]
            if existing["model_uri"] == stored and existing["details"].get("copied_from") == (source if copy else None):
                return existing
            raise RegistryError(f"model id {model_id!r} is already registered for {existing['model_uri']} "
                                f"(by {existing['registered_by']}): choose another id")
        if not io.exists(source, self.options):
            raise RegistryError(f"model folder {source} does not exist")
        if pairs_uri and not pairs_hash:
            pairs_hash = table_hash(_absolute(pairs_uri), self.options)
        if metrics_uri and (steps is None or final_loss is None):
            summary = training_summary(_absolute(metrics_uri), self.options)
            steps = summary["steps"] if steps is None else steps
            final_loss = summary["final_loss"] if final_loss is None else final_loss
        if evaluation_uri and evaluation is None:
            evaluation = evaluation_results(_absolute(evaluation_uri), options=self.options)
        if copy:
            io.copy_folder(source, stored, self.options)
            details = {**(details or {}), "copied_from": source}
        self._append(state, {
            "event": "registered", "model_id": model_id, "model_uri": stored, "base_model": base_model,
            "objective": objective, "run_id": run_id, "pairs_uri": _absolute(pairs_uri) if pairs_uri else None,
            "pairs_hash": pairs_hash, "config_hash": config_hash, "round": round, "steps": steps,
            "final_loss": final_loss, "metrics_uri": _absolute(metrics_uri) if metrics_uri else None,
            "evaluation": json.dumps(evaluation, sort_keys=True) if evaluation else None,
            "evaluation_uri": _absolute(evaluation_uri) if evaluation_uri else None,
            "details": json.dumps(details, sort_keys=True) if details else None, "reason": reason,
            "created_by": by})
        return self.get(model_id)

    def record_evaluation(self, model_id: str, evaluation: dict | None = None, evaluation_uri: str | None = None,
                          reason: str | None = None, by: str | None = None) -> dict:
        """Attach evaluation results (given, or read from an evaluation table) to a registered model."""
        state = self.state()
        self.get(model_id, state)
        if evaluation is None:
            if not evaluation_uri:
                raise RegistryError("give the evaluation results or the evaluation table they are in")
            evaluation = evaluation_results(_absolute(evaluation_uri), options=self.options)
        return self._append(state, {"event": "evaluated", "model_id": model_id, "reason": reason, "created_by": by,
                                    "evaluation": json.dumps(evaluation, sort_keys=True),
                                    "evaluation_uri": _absolute(evaluation_uri) if evaluation_uri else None})

    @staticmethod
    def _check_reason(reason: str | None, action: str) -> str:
        if not reason or not reason.strip():
            raise RegistryError(f"{action} needs a reason (it is recorded with who and when)")
        return reason

    def promote(self, alias: str, model_id: str, reason: str, by: str | None = None,
                details: dict | None = None) -> dict:
        """Make `model_id` the alias's current model: one event, written atomically. Returns the event."""
        _check_name("alias", alias)
        self._check_reason(reason, "promote")
        state = self.state()
        model = self.get(model_id, state)
        if model["rejected"]:
            raise RegistryError(f"model {model_id!r} was rejected ({model['rejected']['reason']}): a rejected model "
                                f"is not promoted; register its folder again under a new id to try it again")
        previous = state.current.get(alias)
        if previous == model_id:
            raise RegistryError(f"model {model_id!r} is already current for {alias!r}")
        return self._append(state, {"event": "promoted", "model_id": model_id, "alias": alias,
                                    "previous_model_id": previous, "reason": reason, "created_by": by,
                                    "details": json.dumps(details, sort_keys=True) if details else None})

    def reject(self, model_id: str, reason: str, by: str | None = None, alias: str | None = None,
               details: dict | None = None) -> dict:
        """Record that a candidate is refused (e.g. by the evaluation gate, for `alias`); nothing current changes."""
        if alias is not None:
            _check_name("alias", alias)
        self._check_reason(reason, "reject")
        state = self.state()
        self.get(model_id, state)
        if aliases := state.aliases_of(model_id):
            raise RegistryError(f"model {model_id!r} is current for {', '.join(aliases)}: roll it back before "
                                f"rejecting it")
        return self._append(state, {"event": "rejected", "model_id": model_id, "alias": alias,
                                    "previous_model_id": state.current.get(alias) if alias else None,
                                    "reason": reason, "created_by": by,
                                    "details": json.dumps(details, sort_keys=True) if details else None})

    def rollback(self, alias: str, reason: str, by: str | None = None) -> dict:
        """Make the alias's model before its latest promotion current again (skipping models rejected since): one
        event, written atomically. Returns the event (`model_id` restored, `previous_model_id` rolled back)."""
        _check_name("alias", alias)
        self._check_reason(reason, "roll back")
        state = self.state()
        stack = state.stacks.get(alias, [])
        if not stack:
            raise RegistryError(f"alias {alias!r} has no current model in the registry at {self.uri}")
        earlier = [m for m in stack[:-1] if not state.models[m]["rejected"]]
        if not earlier:
            raise RegistryError(f"alias {alias!r} has no earlier model to roll back to (current: {stack[-1]!r})")
        return self._append(state, {"event": "rolled_back", "model_id": earlier[-1], "alias": alias,
                                    "previous_model_id": stack[-1], "reason": reason, "created_by": by})
