"""Shard bookkeeping of the sharded stages (frames, sample, reflect): the plan, the resume test, failure rows, and
the order a shard is written in.

A shard's table manifest is written last, after the shard's failures, so it is what marks the shard done. A stage
resumes by skipping shards that are `stored` (table and manifest exist, the manifest describes the stored bytes)
and hold what this run would write; what the latter means is the stage's: the frames stage compares the keys a
shard holds with its plan, sample and reflect the config hash its rows carry.
"""

from __future__ import annotations

import datetime
import traceback
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from leanpo_core import io, schemas

if TYPE_CHECKING:
    import pyarrow as pa


def plan(items: list, size: int) -> dict[int, list]:
    """{i: items[i * size:(i + 1) * size]}: the shards depend only on the items' order and `size`."""
    return {i: items[i * size:(i + 1) * size] for i in range((len(items) + size - 1) // size)}


def stored(uri: str, options: io.StorageOptions | None = None) -> bool:
    """True if the table at `uri` and its manifest exist and the manifest describes the stored bytes (a writer killed
    between a rewrite of the table and of its manifest leaves a stale one)."""
    try:
        manifest = io.read_manifest(uri, options)
        fs, path = io.filesystem(uri, options)
        return fs.size(path) == manifest.bytes
    except FileNotFoundError:
        return False


def column(uri: str, spec: schemas.TableSpec, name: str, options: io.StorageOptions | None = None) -> list:
    """One column of a stored shard, by ranged reads: a resume check must not download every shard's pixels."""
    return io.read_columns(uri, spec, [name], options).column(name).to_pylist()


def failure_row(stage: str, item_id: str | None, video: str | None, error_type: str, message: str,
                trace: str | None = None) -> dict[str, Any]:
    """A row of the failures table: what failed at `stage`, why, and when."""
    return {"stage": stage, "id": item_id, "video": video, "error_type": error_type, "message": message,
            "traceback": trace, "attempt": 1, "created_at": datetime.datetime.now(datetime.timezone.utc)}


def exception_row(stage: str, item_id: str | None, video: str | None, exc: BaseException,
                  message: str | None = None) -> dict[str, Any]:
    """The failure row of an exception: its type, `message` (default: its text, or its type when it has none) and
    traceback."""
    return failure_row(stage, item_id, video, type(exc).__name__,
                       (str(exc) or type(exc).__name__) if message is None else message,
                       "".join(traceback.format_exception(exc)))


def write(index: int, rows: pa.Table | Iterable[Mapping], uri: str, spec: schemas.TableSpec, failures: list[dict],
          failures_uri: str, options: io.StorageOptions | None = None, *,
          empty_failures: bool = False) -> tuple[io.Manifest, io.Manifest | None]:
    """Store shard `index`: its failures first, then its rows, whose manifest, written last, marks the shard done.

    Returns (table manifest, failures manifest or None). An empty failures shard is written only over a stale one
    an earlier attempt left, or always with `empty_failures` (for a stage whose resume test reads it).
    """
    failures_manifest = None
    if failures or empty_failures or io.exists(io.shard_uri(failures_uri, index), options):
        failures_manifest = io.write_shard(failures, failures_uri, schemas.FAILURES, index, options)
    return io.write_shard(rows, uri, spec, index, options), failures_manifest


def stored_manifests(index: int, uri: str, failures_uri: str,
                     options: io.StorageOptions | None = None) -> tuple[io.Manifest, io.Manifest | None]:
    """(table manifest, failures manifest or None) of a stored shard; a failures shard exists only where some item
    failed (or the stage writes it always)."""
    try:
        failures = io.read_manifest(io.shard_uri(failures_uri, index), options)
    except FileNotFoundError:
        failures = None
    return io.read_manifest(io.shard_uri(uri, index), options), failures
