"""What every task shares: which failures are worth a retry, and artifacts for the tables a task wrote."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_link_artifact, create_table_artifact

from leanpo_core import io, schemas
from leanpo_core.config import ConfigError

# Errors a retry cannot fix: the same input and config fail the same way again.
DETERMINISTIC = (ConfigError, schemas.SchemaMismatch, ValueError, TypeError, KeyError)


def transient_only(task, task_run, state) -> bool:
    """Prefect retry condition: retry I/O, storage and engine-start failures, never a deterministic error."""
    try:
        state.result()
    except io.StorageError:
        return True  # StorageError is an OSError, never a ValueError; listed first for clarity
    except DETERMINISTIC:
        return False
    except Exception:
        return True
    return False


def _cell(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, list) and len(value) > 8:
        return f"{value[:8]}… ({len(value)} items)"
    if isinstance(value, str) and len(value) > 200:
        return value[:199] + "…"
    return value if value is None or isinstance(value, (int, float, bool, str)) else str(value)


def publish_table(manifest: io.Manifest, spec: schemas.TableSpec, rows: int = 10) -> None:
    """A link to a written table and its first rows, as artifacts of the running task (keys per table name)."""
    key = spec.name.replace("_", "-")
    link = manifest.uri if "://" in manifest.uri else f"file://{manifest.uri}"
    create_link_artifact(key=f"{key}-table", link=link, link_text=manifest.uri,
                         description=f"`{spec.name}` v{spec.version}: {manifest.rows} rows, sha256 "
                                     f"{manifest.content_hash[:12]}. Open with `leanpo inspect {manifest.uri}`.")
    first = _first_rows(manifest.uri, spec, rows)
    if first:
        create_table_artifact(key=f"{key}-sample", table=[{k: _cell(v) for k, v in r.items()} for r in first],
                              description=f"First {len(first)} of {manifest.rows} rows of `{manifest.uri}`")


def _first_rows(uri: str, spec: schemas.TableSpec, rows: int) -> list[dict]:
    if uri.endswith(".parquet"):
        return io.read_table(uri, spec).slice(0, rows).to_pylist()
    shards = [u for u in io.list_uris(uri) if u.endswith(".parquet")]
    for shard in shards:
        table = io.read_table(shard, spec)
        if table.num_rows:
            return table.slice(0, rows).to_pylist()
    return []
