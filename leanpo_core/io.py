"""Where tables live: one Parquet object per table (or per shard), in a local folder or on S3, written atomically.

Every stage reads and writes through here, so a URI is all that passes between stages (`/data/run1/pairs.parquet`
and `s3://bucket/run1/pairs.parquet` behave the same). Guarantees:

- A reader sees the previous version or the new one, never a half-written table, even if the writer is SIGKILLed:
  locally we write a hidden temporary file in the target folder, fsync it and `os.replace` it; on S3 one PUT (or one
  multipart upload) becomes visible only when it completes.
- Every table `<folder>/<name>` gets a sidecar `<folder>/_<name>.manifest.json` (row count, schema version, sha256
  of the Parquet bytes), written after the table, so a manifest never describes bytes that are not there yet.
  Parquet readers skip names that start with `_` or `.` (the Hive and Spark convention, pyarrow.dataset's default),
  so a table's folder, manifests and our temporaries included, opens as it is in pandas, pyarrow, polars and duckdb
  (README.md shows how). Manifests of the older `<uri>.manifest.json` layout are still read.
- The S3 endpoint comes from `StorageOptions` or the environment (`LEANPO_S3_ENDPOINT_URL`, then `AWS_ENDPOINT_URL`);
  credentials only from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`) or explicit options,
  never from config files or instance metadata, and they never appear in an error message.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Mapping

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from leanpo_core import schemas

MANIFEST_SUFFIX = ".manifest.json"
SHARD_PREFIX = "part-"
_SHARD_NAME = re.compile(re.escape(SHARD_PREFIX) + r"(\d+)\.parquet")
_S3_SCHEMES = ("s3", "s3a")


class StorageError(OSError):
    """A storage location cannot be reached or written; the message names the URI (and endpoint), never secrets."""


@dataclass(frozen=True)
class StorageOptions:
    """How to reach S3. Unset fields fall back to the environment; local paths ignore all of this."""

    endpoint_url: str | None = None
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    connect_timeout: float = 5.0  # seconds; a dead endpoint should fail a stage fast, not after botocore's 60 s
    max_attempts: int = 3  # botocore "standard" retries; s3fs adds its own for throttling and dropped reads

    def resolved(self) -> StorageOptions:
        """Fill unset fields from the environment, read at call time so a changed environment takes effect."""
        env = os.environ
        return StorageOptions(
            endpoint_url=self.endpoint_url or env.get("LEANPO_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL"),
            key=self.key or env.get("AWS_ACCESS_KEY_ID"),
            secret=self.secret or env.get("AWS_SECRET_ACCESS_KEY"),
            token=self.token or env.get("AWS_SESSION_TOKEN"),
            connect_timeout=self.connect_timeout,
            max_attempts=self.max_attempts,
        )


@dataclass(frozen=True)
class Manifest:
    """What a writer promises about one stored table; tasks return this instead of the data."""

    uri: str
    table: str
    rows: int
    schema_version: int
    content_hash: str  # sha256 hex digest of the stored Parquet bytes
    bytes: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Manifest:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def _split(uri: str) -> tuple[str, str]:
    scheme, sep, rest = uri.partition("://")
    return (scheme.lower(), rest) if sep else ("file", uri)


def _is_s3(uri: str) -> bool:
    return _split(uri)[0] in _S3_SCHEMES


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem for `uri` and the path to hand it (no scheme; absolute for local paths)."""
    scheme, rest = _split(uri)
    if scheme == "file":
        return fsspec.filesystem("file"), os.path.abspath(rest)
    if scheme not in _S3_SCHEMES:
        raise StorageError(f"unsupported storage scheme {scheme!r} in {uri}: use a local path or s3://")
    opts = (options or StorageOptions()).resolved()
    creds = {"key": opts.key, "secret": opts.secret, "token": opts.token} if opts.key and opts.secret else {}
    fs = fsspec.filesystem(
        "s3",
        # Without credentials go anonymous: botocore's own chain would read ~/.aws and probe instance metadata.
        anon=not creds,
        **creds,
        endpoint_url=opts.endpoint_url,
        # Another process may write shards at any time; a cached listing would hide them from a resuming stage.
        use_listings_cache=False,
        config_kwargs={"connect_timeout": opts.connect_timeout,
                       "retries": {"max_attempts": opts.max_attempts, "mode": "standard"}},
    )
    return fs, rest.rstrip("/")


def _endpoint(uri: str, options: StorageOptions | None) -> str:
    if not _is_s3(uri):
        return ""
    endpoint = (options or StorageOptions()).resolved().endpoint_url
    return f" (endpoint {endpoint or 'AWS default'})"


def _scrub(text: str, options: StorageOptions | None) -> str:
    opts = (options or StorageOptions()).resolved()
    for secret in (opts.secret, opts.token, opts.key):
        if secret:
            text = text.replace(secret, "***")
    return text


@contextlib.contextmanager
def storage_errors(action: str, uri: str, options: StorageOptions | None, missing_ok: bool) -> Iterator[None]:
    """Turn any backend failure (botocore and aiohttp errors are not OSErrors) into one StorageError that names
    `uri` and the endpoint, secrets scrubbed; with `missing_ok`, a missing object stays a FileNotFoundError."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        if missing_ok:
            raise FileNotFoundError(errno.ENOENT, f"nothing stored at {uri}") from exc
        raise StorageError(f"cannot {action} {uri}{_endpoint(uri, options)}: location does not exist") from exc
    except Exception as exc:
        detail = _scrub(f"{type(exc).__name__}: {exc}", options)
        raise StorageError(f"cannot {action} {uri}{_endpoint(uri, options)}: {detail}") from exc


def _write_local(path: str, data: bytes | pa.Buffer) -> None:
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    # Hidden name in the same folder: os.replace is atomic only within one filesystem, and listings skip dotfiles.
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & umask, unlike mkstemp's 0o600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable across a power loss
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _put_atomic(uri: str, data: bytes | pa.Buffer, options: StorageOptions | None) -> None:
    fs, path = filesystem(uri, options)
    with storage_errors("write", uri, options, missing_ok=False):
        if _is_s3(uri):
            # one PUT, or a multipart upload that is invisible until completed (botocore wants bytes)
            fs.pipe_file(path, data if isinstance(data, bytes) else data.to_pybytes())
        else:
            _write_local(path, data)


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Store a small non-table object (a report, a plot) atomically, with the same guarantees as a table."""
    _put_atomic(uri, data, options)


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    """A whole stored object in one GET (ranged reads of an object being overwritten could mix two versions).

    FileNotFoundError when nothing is stored there; StorageError (naming the URI and endpoint) for anything else.
    """
    fs, path = filesystem(uri, options)
    with storage_errors("read", uri, options, missing_ok=True):
        return fs.cat_file(path)


_SAMPLE_BYTES = 1 << 20


def _binary_compression(column: pa.ChunkedArray) -> str:
    """zstd for a binary column whose sample (1 MiB from each of its first 4 values) shrinks by 10% or more, else
    none. Raw pixels of real clips shrink 15-55% at zstd's 400-550 MB/s; noise-like pixels (the synthetic bench
    clip: 3%) would spend 0.35 s of CPU per 100 MB on nothing. Decided by the data alone: same table, same bytes."""
    parts: list[bytes] = []
    for chunk in column.chunks:  # through the buffers: column[i] would copy a 100 MB value into a scalar
        if len(chunk) == 0 or chunk.buffers()[2] is None:
            continue
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], dtype=width)[chunk.offset:chunk.offset + len(chunk) + 1]
        for start, end in zip(offsets[:4 - len(parts)], offsets[1:5 - len(parts)]):
            parts.append(chunk.buffers()[2].slice(int(start), min(int(end - start), _SAMPLE_BYTES)).to_pybytes())
        if len(parts) == 4:
            break
    sample = b"".join(parts)  # a null value has no bytes
    if len(sample) < 4096:
        return "zstd"  # small values: compression is cheap whatever it saves
    return "zstd" if len(pa.Codec("zstd", 1).compress(sample)) <= 0.9 * len(sample) else "none"


def _leaf_paths(schema: pa.Schema) -> list[str]:
    """Parquet's column paths of `schema` ("frame_indices.list.element" for a list): a per-column compression
    setting names these, and a nested column left out of it would be stored uncompressed."""
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    parquet_schema = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    return [parquet_schema.column(i).path for i in range(len(parquet_schema))]


def write_table(data: pa.Table | Iterable[Mapping], uri: str, spec: schemas.TableSpec,
                options: StorageOptions | None = None) -> Manifest:
    """Conform `data` to `spec`, store it as Parquet (zstd) at `uri` atomically, then its manifest; return it."""
    table = schemas.conform(data, spec)
    table_rows = table.num_rows
    sink = pa.BufferOutputStream()
    # Dictionary encoding and statistics pay off on small values; on a frames cell of 100+ MB of raw pixels they
    # cost seconds (3.1 s vs 0.6 s for 200 MB), so binary columns go without them, and zstd only where it pays.
    binary = {f.name for f in table.schema if pa.types.is_large_binary(f.type) or pa.types.is_binary(f.type)}
    small = [f.name for f in table.schema if f.name not in binary]
    codecs = {name: _binary_compression(table.column(name)) for name in binary}
    compression = {path: codecs.get(path.split(".")[0], "zstd") for path in _leaf_paths(table.schema)}
    pq.write_table(table, sink, compression=compression, use_dictionary=small, write_statistics=small)
    payload = sink.getvalue()  # a pyarrow Buffer: hashed and written without another copy of the bytes
    del table, sink
    _put_atomic(uri, payload, options)
    manifest = Manifest(uri=uri, table=spec.name, rows=table_rows, schema_version=spec.version,
                        content_hash=hashlib.sha256(payload).hexdigest(), bytes=payload.size)
    _put_atomic(manifest_uri(uri), json.dumps(manifest.to_dict(), indent=2).encode(), options)
    return manifest


def read_table(uri: str, spec: schemas.TableSpec, options: StorageOptions | None = None) -> pa.Table:
    """Read the table at `uri`; raise SchemaMismatch unless it was written as `spec` at `spec`'s version."""
    table = pq.read_table(pa.BufferReader(read_bytes(uri, options)))
    return schemas.check_version(table, spec)


def read_any(uri: str, options: StorageOptions | None = None) -> tuple[pa.Table, schemas.TableSpec | None]:
    """Read a stored table of any kind (for inspection) with the spec its metadata names, if it is one of ours; the
    folder of a sharded table (frames, samples, scored, failures) reads as its shards concatenated in shard order."""
    shards = shard_uris(uri, options)
    if not shards:
        return _read_one(uri, options)
    parts = [_read_one(shard, options) for shard in shards.values()]
    return pa.concat_tables([table for table, _ in parts]), parts[0][1]


def _read_one(uri: str, options: StorageOptions | None) -> tuple[pa.Table, schemas.TableSpec | None]:
    table = pq.read_table(pa.BufferReader(read_bytes(uri, options)))
    name = (table.schema.metadata or {}).get(schemas.TABLE_KEY, b"").decode()
    spec = schemas.TABLES.get(name)
    return (schemas.check_version(table, spec), spec) if spec else (table, None)


def manifest_uri(uri: str) -> str:
    """The URI of the sidecar manifest of the table at `uri` (`run/pairs.parquet` -> `run/_pairs.parquet.manifest.json`,
    the same for s3:// URIs); the `_` makes Parquet readers that open the table's folder skip it."""
    folder, sep, name = uri.rpartition("/")
    return f"{folder}{sep}_{name}{MANIFEST_SUFFIX}"


def read_manifest(uri: str, options: StorageOptions | None = None) -> Manifest:
    """Read the manifest of the table at `uri` (pass the table's URI, not the sidecar's).

    The table is written before its manifest, so a writer killed in between leaves the previous manifest: compare
    `content_hash` against the table's bytes where that matters. A table stored before manifests took their `_`
    prefix has its manifest at `<uri>.manifest.json`, read when `manifest_uri(uri)` does not exist.
    """
    try:
        data = read_bytes(manifest_uri(uri), options)
    except FileNotFoundError as missing:
        try:
            data = read_bytes(uri + MANIFEST_SUFFIX, options)
        except FileNotFoundError:
            raise missing from None
    return Manifest.from_dict(json.loads(data))


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    """True if a table (or a folder / prefix of shards) is stored at `uri`."""
    fs, path = filesystem(uri, options)
    with storage_errors("check", uri, options, missing_ok=True):
        return fs.exists(path)


def join_uri(root: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with "/", whichever kind `root` is."""
    pieces = [root.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
    return "/".join(pieces)


def list_uris(prefix: str, options: StorageOptions | None = None) -> list[str]:
    """URIs of every stored file below `prefix` (a folder), sorted; names starting with `_` or `.` (manifests,
    temporaries) are left out, as are manifests of the older `<uri>.manifest.json` layout."""
    fs, path = filesystem(prefix, options)
    with storage_errors("list", prefix, options, missing_ok=True):
        found = fs.find(path)  # a missing prefix lists as empty; a table's own URI lists as itself
    uris = []
    for name in found:
        relative = name[len(path):].lstrip("/")
        if relative.endswith(MANIFEST_SUFFIX) or any(p.startswith(("_", ".")) for p in relative.split("/")):
            continue
        uris.append(join_uri(prefix, relative))
    return sorted(uris)


def shard_uri(root_uri: str, shard_index: int) -> str:
    """The URI of shard `shard_index` of the sharded table at `root_uri`."""
    return join_uri(root_uri, f"{SHARD_PREFIX}{shard_index:05d}.parquet")


def write_shard(rows: pa.Table | Iterable[Mapping], root_uri: str, spec: schemas.TableSpec, shard_index: int,
                options: StorageOptions | None = None) -> Manifest:
    """Write one shard atomically; a stage resumes by skipping shards whose manifest already exists."""
    return write_table(rows, shard_uri(root_uri, shard_index), spec, options)


def shard_uris(root_uri: str, options: StorageOptions | None = None) -> dict[int, str]:
    """{shard index: URI} of every `part-NNNNN.parquet` directly under `root_uri`, in index order."""
    root = root_uri.rstrip("/") + "/"
    found = {int(m.group(1)): uri for uri in list_uris(root_uri, options)
             if (m := _SHARD_NAME.fullmatch(uri[len(root):]))}
    return dict(sorted(found.items()))


def read_dataset(root_uri: str, spec: schemas.TableSpec, options: StorageOptions | None = None) -> pa.Table:
    """Concatenate every shard under `root_uri` in shard order; FileNotFoundError if there is none."""
    shards = shard_uris(root_uri, options)
    if not shards:
        raise FileNotFoundError(errno.ENOENT, f"no {spec.name!r} shards ({SHARD_PREFIX}*.parquet) under {root_uri}")
    return pa.concat_tables([read_table(uri, spec, options) for uri in shards.values()])


def read_columns(uri: str, spec: schemas.TableSpec, columns: list[str],
                 options: StorageOptions | None = None) -> pa.Table:
    """Some columns of a stored table by ranged reads (an index without the pixels of a frames shard).

    Checks the table's name and version like `read_table`. Ranged reads could straddle a concurrent overwrite; use
    this for indexes that a full `read_table` of the same shard confirms later, not for the data itself.
    """
    fs, path = filesystem(uri, options)
    with storage_errors("read", uri, options, missing_ok=True):
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            meta = parquet.schema_arrow.metadata or {}
            table = parquet.read(columns=columns)
    name, version = meta.get(schemas.TABLE_KEY, b"").decode(), meta.get(schemas.VERSION_KEY, b"").decode()
    if name != spec.name or version != str(spec.version):
        raise schemas.SchemaMismatch(f"{uri}: expected table {spec.name!r} v{spec.version}, found {name or '?'!r} "
                                     f"v{version or '?'}")
    return table


def dataset_manifest(root_uri: str, spec: schemas.TableSpec, options: StorageOptions | None = None) -> Manifest:
    """One manifest for a sharded table: total rows and a hash over the shards' hashes in shard order.

    Built from the shards' sidecar manifests (no table is read), so two runs that stored the same shards give the
    same hash; `uri` is the dataset's folder and `bytes` the shards' total.
    """
    shards = list(shard_uris(root_uri, options).items())
    found = [read_manifest(uri, options) for _, uri in shards]
    digest = hashlib.sha256("".join(f"{i}:{m.content_hash};" for (i, _), m in zip(shards, found)).encode())
    return Manifest(uri=root_uri, table=spec.name, rows=sum(m.rows for m in found), schema_version=spec.version,
                    content_hash=digest.hexdigest(), bytes=sum(m.bytes for m in found))


def copy_folder(source: str, dest: str, options: StorageOptions | None = None) -> None:
    """Copy a folder (a model) to `dest`, replacing what was there; either may be local or S3. Not atomic: callers
    make the copy count by a record written after it (the registry's `registered` event, a published.json, a
    serving pointer), so a copy cut short is overwritten by the next try."""
    src_fs, src_path = filesystem(source, options)
    dst_fs, dst_path = filesystem(dest, options)
    with storage_errors("copy a folder to", dest, options, missing_ok=False):
        if "://" not in source and "://" not in dest:
            shutil.rmtree(dst_path, ignore_errors=True)
            shutil.copytree(src_path, dst_path)
        elif "://" not in source:
            dst_fs.put(src_path.rstrip("/") + "/", dst_path, recursive=True)
        elif "://" not in dest:
            src_fs.get(src_path.rstrip("/") + "/", dst_path, recursive=True)
        else:
            src_fs.copy(src_path.rstrip("/") + "/", dst_path, recursive=True)


def preview(value, width: int = 200):
    """A table cell for people (artifacts, `leanpo inspect`): bytes as their size, a long list as its first 8 items
    and its length, a string cut at `width` characters; numbers, booleans and None as they are, anything else as
    text."""
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, list) and len(value) > 8:
        value = f"{value[:8]}… ({len(value)} items)"
    if value is None or isinstance(value, (int, float, bool)):
        return value
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"
