"""leanpo_core.io on a local folder and on a real SeaweedFS S3 server: the `root` tests run one body on both.

The kill tests stop the writer at the worst moment on purpose, not by timing: locally when the temporary file is
fully written but not yet renamed (its fsync), on S3 when every part of a multipart upload is stored but the upload
is not yet completed. SIGKILL there must leave the previous table readable and nothing else visible.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pyarrow as pa
import pytest

from leanpo_core import io, schemas
from leanpo_core.io import StorageError, StorageOptions

REPO = Path(__file__).resolve().parents[2]


def sample_value(type_: pa.DataType, i: int):
    """One value of an Arrow type; an unknown type fails loudly so a new schema type cannot go untested."""
    if pa.types.is_string(type_):
        return f"value {i} ünïcode ✓"
    if pa.types.is_int64(type_):
        return 2**40 + i  # beyond int32: a narrowing bug would show
    if pa.types.is_integer(type_):
        return -7 + i
    if pa.types.is_floating(type_):
        return 0.25 + i
    if pa.types.is_boolean(type_):
        return i % 2 == 0
    if pa.types.is_large_binary(type_) or pa.types.is_binary(type_):
        return bytes(range(256)) * 3 + bytes([i % 256])
    if pa.types.is_timestamp(type_):
        return dt.datetime(2025, 3, 4, 5, 6, 7, 890123 + i, tzinfo=dt.timezone.utc)
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return [sample_value(type_.value_type, i + k) for k in range(3)]
    raise NotImplementedError(f"no sample value for Arrow type {type_}")


def sample_rows(spec: schemas.TableSpec, n: int = 2) -> list[dict]:
    """`n` rows of `spec`; every odd row holds nulls in all nullable columns."""
    return [{f.name: None if f.nullable and i % 2 else sample_value(f.type, i) for f in spec.schema}
            for i in range(n)]


def evaluation_rows(tag: str, n: int) -> list[dict]:
    return [dict(run_id=tag, model="m", split="test", metric="acc", value=float(i), n=n, ci_low=None,
                 ci_high=None, details=None)
            for i in range(n)]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A fresh, empty storage root: a local folder or an s3:// prefix (with the environment pointing at the server)."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_root")


def stored_bytes(uri: str) -> bytes:
    fs, path = io.filesystem(uri)
    return fs.cat_file(path)


@pytest.mark.parametrize("spec", list(schemas.TABLES.values()), ids=list(schemas.TABLES))
def test_round_trip_every_table(root, spec):
    rows = sample_rows(spec)
    uri = io.join_uri(root, "run", f"{spec.name}.parquet")
    io.write_table(rows, uri, spec)
    table = io.read_table(uri, spec)
    assert table.schema.equals(spec.schema)
    assert table.schema.metadata[schemas.VERSION_KEY] == str(spec.version).encode()
    assert table.to_pylist() == rows


def test_manifest_describes_stored_bytes(root):
    spec = schemas.FRAMES
    uri = io.join_uri(root, "frames.parquet")
    manifest = io.write_table(sample_rows(spec, 5), uri, spec)
    data = stored_bytes(uri)
    assert manifest == io.Manifest(uri=uri, table="frames", rows=5, schema_version=spec.version,
                                   content_hash=hashlib.sha256(data).hexdigest(), bytes=len(data))
    assert io.read_manifest(uri) == manifest
    assert io.Manifest.from_dict(manifest.to_dict()) == manifest
    with pytest.raises(dataclasses.FrozenInstanceError):
        manifest.rows = 6


def test_binary_columns_compressed_only_where_it_pays(tmp_path):
    """Raw pixels that zstd cannot shrink (noise) are stored plain, compressible ones zstd, small columns always
    zstd; the choice depends on the bytes alone, so the same rows still give the same file."""
    import numpy as np
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    noise, smooth = rng.integers(0, 256, 3 << 20, dtype=np.uint8).tobytes(), bytes(range(256)) * (3 << 12)
    row = sample_rows(schemas.FRAMES, 1)[0]
    for name, pixels, expected in (("noise", noise, "UNCOMPRESSED"), ("smooth", smooth, "ZSTD")):
        uri = str(tmp_path / f"{name}.parquet")
        manifest = io.write_table([{**row, "frames": pixels}], uri, schemas.FRAMES)
        meta = pq.ParquetFile(uri).metadata.row_group(0)
        codecs = {meta.column(i).path_in_schema: meta.column(i).compression for i in range(meta.num_columns)}
        assert codecs.pop("frames") == expected and set(codecs.values()) == {"ZSTD"}, codecs
        assert io.read_table(uri, schemas.FRAMES).column("frames")[0].as_py() == pixels
        again = io.write_table([{**row, "frames": pixels}], str(tmp_path / f"{name}-again.parquet"), schemas.FRAMES)
        assert again.content_hash == manifest.content_hash


def test_version_or_table_mismatch_raises(root):
    uri = io.join_uri(root, "videos.parquet")
    io.write_table(sample_rows(schemas.VIDEOS), uri, schemas.VIDEOS)
    with pytest.raises(schemas.SchemaMismatch, match="v2"):
        io.read_table(uri, dataclasses.replace(schemas.VIDEOS, version=2))
    with pytest.raises(schemas.SchemaMismatch, match="'pairs'"):
        io.read_table(uri, schemas.PAIRS)


def test_exists_list_and_missing(root):
    uri = io.join_uri(root, "a", "evaluation.parquet")
    assert not io.exists(uri)
    assert io.list_uris(root) == []
    with pytest.raises(FileNotFoundError, match="evaluation.parquet"):
        io.read_table(uri, schemas.EVALUATION)
    io.write_table(evaluation_rows("x", 3), uri, schemas.EVALUATION)
    assert io.exists(uri) and io.exists(io.join_uri(root, "a"))
    assert io.list_uris(root) == [uri]
    assert io.list_uris(uri) == [uri]


def test_overwrite_keeps_concurrent_readers_consistent(root):
    """Each version has its own tag and row count, so a reader that saw a mix of two versions would notice."""
    spec, uri = schemas.EVALUATION, io.join_uri(root, "evaluation.parquet")
    sizes = {f"v{i}": 2000 + 37 * i for i in range(8)}
    io.write_table(evaluation_rows("v0", sizes["v0"]), uri, spec)
    stop, seen, errors = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            try:
                table = io.read_table(uri, spec)
                tags = set(table.column("run_id").to_pylist())
                assert len(tags) == 1 and table.num_rows == sizes[tags.pop()], "mixed or torn table"
                seen.append(table.num_rows)
            except Exception as exc:  # reported on the main thread
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(1, 8):
        io.write_table(evaluation_rows(f"v{i}", sizes[f"v{i}"]), uri, spec)
    time.sleep(0.05)
    stop.set()
    thread.join()
    assert not errors, errors
    assert seen
    assert io.read_table(uri, spec).num_rows == sizes["v7"]
    assert io.read_manifest(uri).rows == sizes["v7"]
    assert io.list_uris(root) == [uri]


def test_shards_read_back_in_shard_order(root):
    spec = schemas.EVALUATION
    shards = io.join_uri(root, "evaluation")
    with pytest.raises(FileNotFoundError, match="no 'evaluation' shards"):
        io.read_dataset(shards, spec)
    for index in (2, 0, 10, 1):
        manifest = io.write_shard(evaluation_rows(f"shard{index}", index + 1), shards, spec, index)
        assert manifest.uri == io.join_uri(shards, f"part-{index:05d}.parquet")
    fs, path = io.filesystem(shards)
    fs.pipe_file(f"{path}/.part-00005.parquet.0123.tmp", b"half a table")  # a killed writer's leftover
    fs.pipe_file(f"{path}/notes.txt", b"not a shard")
    fs.pipe_file(f"{path}/_SUCCESS", b"")  # another tool's marker: `_` names are nobody's data
    table = io.read_dataset(shards, spec)
    tags = table.column("run_id").to_pylist()
    assert tags == [f"shard{i}" for i in (0, 1, 1, 2, 2, 2) + (10,) * 11]
    assert io.list_uris(shards) == sorted([*(io.shard_uri(shards, i) for i in (0, 1, 2, 10)),
                                           io.join_uri(shards, "notes.txt")])


def test_manifest_uri_sits_beside_the_table_behind_an_underscore():
    assert io.manifest_uri("/data/run/frames/part-00001.parquet") == (
        "/data/run/frames/_part-00001.parquet.manifest.json")
    assert io.manifest_uri("s3://bucket/a/b.parquet") == "s3://bucket/a/_b.parquet.manifest.json"
    assert io.manifest_uri("pairs.parquet") == "_pairs.parquet.manifest.json"


def assert_every_reader_counts(folder: str) -> int:
    """pyarrow.dataset, pandas, polars and duckdb open the table folder `folder` (local or s3://) as it is, sidecar
    manifests and leftovers included, and each counts the rows that the folder's manifests promise (returned).

    The forms are README.md's. Given a bare S3 prefix, polars and duckdb look for an object of that name, so there
    only their `*.parquet` form is checked; duckdb reaches S3 through our fsspec client, as its own S3 client is an
    extension it would download.
    """
    import duckdb
    import pandas
    import polars
    import pyarrow.dataset as ds

    expected = sum(io.read_manifest(uri).rows for uri in io.list_uris(folder) if uri.endswith(".parquet"))
    local, files = "://" not in folder, io.join_uri(folder, "*.parquet")
    duck = duckdb.connect()
    if not local:
        duck.register_filesystem(io.filesystem(folder)[0])
    counts = {"pyarrow.dataset": ds.dataset(folder).count_rows(),
              "pandas": len(pandas.read_parquet(folder)),
              "polars *.parquet": polars.scan_parquet(files).select(polars.len()).collect().item(),
              "duckdb *.parquet": duck.sql(f"select count(*) from read_parquet('{files}')").fetchone()[0]}
    if local:
        counts["polars folder"] = polars.scan_parquet(folder, hidden_file_prefix=["_", "."]).select(
            polars.len()).collect().item()
        counts["duckdb folder"] = duck.sql(f"select count(*) from read_parquet('{folder}')").fetchone()[0]
    assert counts == dict.fromkeys(counts, expected), f"{folder}: manifests say {expected} rows"
    return expected


def test_table_folders_open_in_pandas_pyarrow_polars_and_duckdb(root):
    """A sharded table (an empty shard among them, as a stage whose items all failed writes) and a single table
    each open as a folder, beside their manifests, a killed writer's temporary and a Spark-style `_SUCCESS`."""
    spec = schemas.SAMPLES
    shards, single = io.join_uri(root, "samples"), io.join_uri(root, "pairs")
    for index, n in enumerate((3, 0, 4)):
        io.write_shard(sample_rows(spec, n), shards, spec, index)
    io.write_table(sample_rows(schemas.PAIRS, 2), io.join_uri(single, "pairs.parquet"), schemas.PAIRS)
    fs, path = io.filesystem(shards)
    fs.pipe_file(f"{path}/.part-00003.parquet.0123.tmp", b"half a table")
    fs.pipe_file(f"{path}/_SUCCESS", b"")
    assert assert_every_reader_counts(shards) == io.dataset_manifest(shards, spec).rows == 7
    assert assert_every_reader_counts(single) == 2


def test_tables_with_the_older_manifest_name_are_still_read(root):
    """Manifests used to sit at `<uri>.manifest.json`: such shards still count as done (a stage's resume check is
    `read_manifest`) and list as before, and a shard written again gets a manifest at the new name, which is read
    before the stale one."""
    spec, shards = schemas.EVALUATION, io.join_uri(root, "evaluation")
    written = [io.write_shard(evaluation_rows(f"shard{i}", i + 2), shards, spec, i) for i in range(3)]
    fs, _ = io.filesystem(root)
    for manifest in written:
        fs.mv(io.filesystem(io.manifest_uri(manifest.uri))[1], io.filesystem(manifest.uri + ".manifest.json")[1])
    assert [io.read_manifest(m.uri) for m in written] == written
    assert io.dataset_manifest(shards, spec).rows == 2 + 3 + 4
    assert io.shard_uris(shards) == dict(enumerate(m.uri for m in written))
    assert io.list_uris(shards) == [m.uri for m in written]
    rewritten = io.write_shard(evaluation_rows("again", 7), shards, spec, 1)
    assert io.read_manifest(rewritten.uri) == rewritten and io.dataset_manifest(shards, spec).rows == 2 + 7 + 4
    fs.rm(io.filesystem(written[2].uri + ".manifest.json")[1])
    with pytest.raises(FileNotFoundError, match=re.escape(io.manifest_uri(written[2].uri))):
        io.read_manifest(written[2].uri)  # no manifest at all: the error names where it should be


# The writer stalls right where the bytes exist but are not yet published, then waits for its SIGKILL.
_KILLED_WRITER = r"""
import asyncio, os, sys, time
import s3fs
from leanpo_core import io, schemas

uri, marker, megabytes = sys.argv[1], sys.argv[2], int(sys.argv[3])

def signal_started():
    open(marker, "w").close()

real_fsync, real_call = os.fsync, s3fs.S3FileSystem._call_s3

def stalled_fsync(fd):
    signal_started()
    time.sleep(3600)

async def stalled_call(self, method, *args, **kwargs):
    if method == "complete_multipart_upload":
        signal_started()
        await asyncio.sleep(3600)
    return await real_call(self, method, *args, **kwargs)

os.fsync, s3fs.S3FileSystem._call_s3 = stalled_fsync, stalled_call
chunk = 8 * 2**20
rows = [dict(video_key=f"k{i}", video="v.mp4", decoder="pyav", sampling="uniform:16", frame_indices=[0],
             timestamps=[0.0], fps=1.0, duration=1.0, num_frames_total=1, width=1, height=1,
             frames_shape=[1, 1, chunk // 3, 3], frames=os.urandom(chunk), config_hash="new")
        for i in range(megabytes * 2**20 // chunk)]
io.write_table(rows, uri, schemas.FRAMES)
print("write completed although it should have stalled", file=sys.stderr)
"""


def test_writer_killed_mid_write_leaves_previous_table(root, tmp_path):
    spec, uri = schemas.FRAMES, io.join_uri(root, "frames.parquet")
    old_rows = sample_rows(spec, 3)
    old_manifest = io.write_table(old_rows, uri, spec)
    marker = tmp_path / "writing"
    # 112 MB: above s3fs's 100 MB threshold, so S3 takes the multipart path (3 parts)
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, uri, str(marker), "112"], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert writer.poll() is None, writer.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "writer never started writing"
            time.sleep(0.05)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stderr.close()
    assert writer.returncode == -signal.SIGKILL

    assert io.read_table(uri, spec).to_pylist() == old_rows
    assert io.read_manifest(uri) == old_manifest
    assert io.list_uris(root) == [uri]
    fs, path = io.filesystem(root)
    if root.startswith("s3://"):
        # The stored parts exist on the server, in an upload nobody can see until it is completed.
        bucket, key = path.split("/", 1)
        uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", [])
        assert [u["Key"] for u in uploads] == [f"{key}/frames.parquet"]
        for upload in uploads:
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    else:
        leftovers = [p for p in fs.find(path) if Path(p).name.startswith(".frames.parquet.") and p.endswith(".tmp")]
        assert len(leftovers) == 1, fs.find(path)
        os.unlink(leftovers[0])  # 112 MB that pytest would otherwise keep for three runs
    new_rows = sample_rows(spec, 1)
    io.write_table(new_rows, uri, spec)  # the leftover does not block the next writer
    assert io.read_table(uri, spec).to_pylist() == new_rows


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_fails_fast_without_secrets(monkeypatch):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    key, secret = "AKIATESTLEAKCHECK01", "s3cr3t-must-not-leak-0123456789"
    monkeypatch.setenv("LEANPO_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    uri = "s3://leanpo-test/run/videos.parquet"
    start = time.monotonic()
    with pytest.raises(StorageError) as raised:
        io.write_table(sample_rows(schemas.VIDEOS), uri, schemas.VIDEOS)
    assert time.monotonic() - start < 15
    with pytest.raises(StorageError) as raised_read:
        io.read_table(uri, schemas.VIDEOS, StorageOptions(max_attempts=1))
    for exc in (raised.value, raised_read.value):
        assert isinstance(exc, OSError)
        assert uri in str(exc) and endpoint in str(exc)
        text = "".join(traceback.format_exception(exc))
        assert secret not in text and key not in text
    assert secret not in repr(StorageOptions(secret=secret).resolved())


def test_unwritable_local_location_is_named(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    uri = str(blocker / "run" / "videos.parquet")
    with pytest.raises(StorageError, match="cannot write .*not-a-folder/run/videos.parquet"):
        io.write_table(sample_rows(schemas.VIDEOS), uri, schemas.VIDEOS)
    with pytest.raises(StorageError, match="unsupported storage scheme 'gs'"):
        io.write_table(sample_rows(schemas.VIDEOS), "gs://bucket/videos.parquet", schemas.VIDEOS)


def test_server_outage_is_a_storage_error_and_recovers(s3_server, s3_root):
    spec, uri = schemas.EVALUATION, io.join_uri(s3_root, "evaluation.parquet")
    rows = evaluation_rows("before", 4)
    io.write_table(rows, uri, spec)
    s3_server.stop()
    try:
        with pytest.raises(StorageError, match=s3_server.endpoint_url):
            io.read_table(uri, spec, StorageOptions(max_attempts=1))
    finally:
        s3_server.start()
    assert io.read_table(uri, spec).to_pylist() == rows
