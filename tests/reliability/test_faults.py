"""Faults injected into a running frames stage, for real: the SeaweedFS S3 server SIGKILLed in the middle of the
stage's Parquet writes, and a local output folder on a real tmpfs that fills up or turns read-only.

- S3 killed: the server process is killed right as the stage sends the PUT of shard 1's table (or of its
  manifest): the stage fails with StorageError naming the URI and endpoint; a reader polling the table all along
  never sees a partial shard; after the server restarts (same ports, same data) a retry skips shard 0, completes the
  table, and it equals a run that had no fault, byte for byte.
- Disk full: the output is a tmpfs with room for exactly one shard, so the second shard's write hits ENOSPC; the
  stage fails with StorageError naming the shard's path; the first shard and its manifest are intact, no temporary
  file is left; with room again, a retry completes the table. Read-only: the same with EROFS.

tmpfs needs `mount`, permitted to root (as on this project's machines); elsewhere those tests are skipped with the
reason.

    .venv/bin/python -m pytest tests/reliability/test_faults.py -p no:cacheprovider
"""

from __future__ import annotations

import hashlib
import subprocess
import threading
from pathlib import Path

import pytest
import s3fs

from leanpo_core import io, schemas
from leanpo_core.config import FramesConfig
from leanpo_core.frames import run_frames
from leanpo_core.io import StorageError
from leanpo_core.videos import write_videos

CONFIG = FramesConfig(num_frames=4, max_side=64, shard_size=2)


@pytest.fixture(scope="module")
def videos(clips, tmp_path_factory) -> str:
    """A local videos table of the six good clips: three shards of two."""
    rows = [{"id": f"q{i}", "video": v, "question": "What moves?", "answer": "x"}
            for i, v in enumerate(clips["good"][:6])]
    uri = str(tmp_path_factory.mktemp("faults") / "videos.parquet")
    write_videos(rows, uri)
    return uri


@pytest.fixture(scope="module")
def reference(videos, tmp_path_factory) -> list[str]:
    """Content hashes of the frames shards of a run without faults."""
    out = tmp_path_factory.mktemp("reference")
    result = run_frames(videos, str(out / "frames"), str(out / "failures"), CONFIG, progress=False)
    return [m.content_hash for m in result.manifests]


class ShardReader(threading.Thread):
    """Reads every stored shard of a table over and over; records any shard that is not whole."""

    def __init__(self, uri: str, rows_per_shard: int):
        super().__init__(daemon=True)
        self.uri, self.rows_per_shard = uri, rows_per_shard
        self.stop, self.reads, self.partial, self.unexpected = threading.Event(), 0, [], []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for shard in io.shard_uris(self.uri).values():
                    table = io.read_table(shard, schemas.FRAMES)
                    for row in table.to_pylist():
                        t, h, w, c = row["frames_shape"]
                        if len(row["frames"]) != t * h * w * c:
                            self.partial.append(shard)
                    if table.num_rows != self.rows_per_shard:
                        self.partial.append(shard)
                    self.reads += 1
            except (StorageError, FileNotFoundError):
                pass  # the server is down (or a shard was listed before it was there): no data, no partial data
            except Exception as exc:  # a torn object would show as a Parquet error here
                self.unexpected.append(repr(exc))
            self.stop.wait(0.05)


@pytest.mark.parametrize("target", ["part-00001.parquet", io.manifest_uri("part-00001.parquet")])
def test_s3_server_killed_mid_write_then_retry_completes(videos, reference, s3_server, s3_root, monkeypatch, target):
    frames_uri, failures_uri = f"{s3_root}/frames", f"{s3_root}/failures"
    real_call = s3fs.S3FileSystem._call_s3
    killed = []

    async def kill_on_put(self, method, *args, **kwargs):
        if method == "put_object" and kwargs.get("Key", "").endswith(f"/frames/{target}") and not killed:
            killed.append(kwargs["Key"])
            s3_server.stop()  # SIGKILL, right as the stage sends this PUT
        return await real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", kill_on_put)
    reader = ShardReader(frames_uri, CONFIG.shard_size)
    reader.start()
    try:
        with pytest.raises(StorageError) as raised:
            run_frames(videos, frames_uri, failures_uri, CONFIG, options=io.StorageOptions(max_attempts=1),
                       progress=False)
        assert killed and not s3_server.running
        message = str(raised.value)
        assert f"{frames_uri}/{target}" in message and s3_server.endpoint_url in message, message
        s3_server.start()
        retried = run_frames(videos, frames_uri, failures_uri, CONFIG, progress=False)
    finally:
        reader.stop.set()
        reader.join()
        s3_server.start()
    assert (retried.skipped_shards, retried.decoded) == (1, 4)
    assert [m.content_hash for m in retried.manifests] == reference
    assert io.read_dataset(frames_uri, schemas.FRAMES).num_rows == 6
    assert reader.reads > 0 and reader.partial == [] and reader.unexpected == []


@pytest.fixture
def tmpfs(tmp_path):
    """A real tmpfs of 16 KiB mounted at tmp_path/mnt (resize with `remount`), unmounted afterwards."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): disk-full tests need root")

    def remount(options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)

    try:
        yield mount, remount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _pages(n: int) -> int:
    return -(-n // 4096)


def _intact(uri: str) -> bool:
    manifest = io.read_manifest(uri)
    data = Path(uri).read_bytes()
    return hashlib.sha256(data).hexdigest() == manifest.content_hash and len(data) == manifest.bytes


def test_disk_full_fails_naming_the_location_and_keeps_earlier_shards(videos, reference, tmp_path, tmpfs):
    mount, remount = tmpfs
    sizing = tmp_path / "sizing"
    run_frames(videos, str(sizing / "frames"), str(sizing / "failures"), CONFIG, progress=False)
    files = sorted(p for p in sizing.rglob("*") if p.is_file())
    first = sum(_pages(p.stat().st_size) for p in files if "part-00000" in p.name)
    second = sum(_pages(p.stat().st_size) for p in files if "part-00001" in p.name)
    assert second >= 2
    remount(f"size={4 * (first + second - 1)}k")  # room for shard 0, one page short for shard 1

    frames_uri, failures_uri = str(mount / "run" / "frames"), str(mount / "run" / "failures")
    with pytest.raises(StorageError) as raised:
        run_frames(videos, frames_uri, failures_uri, CONFIG, progress=False)
    message = str(raised.value)
    assert "part-00001.parquet" in message and str(mount / "run") in message, message
    assert "No space left on device" in message, message
    assert _intact(io.shard_uri(frames_uri, 0)) and _intact(io.shard_uri(failures_uri, 0))
    assert [p.name for p in mount.rglob(".*")] == []  # no temporary file left behind

    remount("size=2m")
    retried = run_frames(videos, frames_uri, failures_uri, CONFIG, progress=False)
    assert retried.skipped_shards == 1 and [m.content_hash for m in retried.manifests] == reference


def test_read_only_output_fails_naming_the_location(videos, tmpfs):
    mount, remount = tmpfs
    remount("size=2m")
    frames_uri, failures_uri = str(mount / "frames"), str(mount / "failures")
    run_frames(videos, frames_uri, failures_uri, CONFIG, shards=[0], progress=False)
    remount("ro")
    with pytest.raises(StorageError, match=rf"cannot write {mount}/failures/part-00001\.parquet.*Read-only file"):
        run_frames(videos, frames_uri, failures_uri, CONFIG, progress=False)
    assert _intact(io.shard_uri(frames_uri, 0)) and _intact(io.shard_uri(failures_uri, 0))


def test_unreachable_video_storage_fails_the_stage_instead_of_recording_failures(clips, s3_server, s3_root, tmp_path):
    """Videos on S3, the server down: the stage raises StorageError (a retry will redo the shard) and records no
    failure row, which a resume would never revisit; once the server is back, every video decodes."""
    fs, prefix = io.filesystem(s3_root)
    videos = []
    for clip in clips["good"][:3]:
        fs.put_file(clip, f"{prefix}/clips/{Path(clip).name}")
        videos.append(f"{s3_root}/clips/{Path(clip).name}")
    table = str(tmp_path / "videos.parquet")  # local: only the videos themselves live on the dead server
    write_videos([{"id": f"q{i}", "video": v, "question": "q?", "answer": "a"} for i, v in enumerate(videos)], table)
    frames_uri, failures_uri = str(tmp_path / "frames"), str(tmp_path / "failures")
    s3_server.stop()
    try:
        with pytest.raises(StorageError, match=rf"cannot read {videos[0]} \(endpoint {s3_server.endpoint_url}\)"):
            run_frames(table, frames_uri, failures_uri, CONFIG, options=io.StorageOptions(max_attempts=1),
                       progress=False)
    finally:
        s3_server.start()
    assert not Path(failures_uri).exists() and not Path(frames_uri).exists()
    result = run_frames(table, frames_uri, failures_uri, CONFIG, progress=False)
    assert (result.decoded, result.failed) == (3, 0)
