r"""Frames: every distinct video of the videos table, decoded once into the (T, H, W, 3) uint8 frames the model sees,
stored in the frames table that sampling, scoring, training and evaluation read (`FrameStore`).

The stage (`run_frames`) writes one frames shard and one failures shard per `shard_size` videos. Decoding
(`leanpo_core.decode`) runs in one long-lived worker process (`leanpo_core.decode_worker`), so a video that hangs
(a stalled mount, a FIFO) is killed after `timeout_s` and the batch goes on; the worker is restarted only then.

    python -m leanpo_core.frames --root runs/r1 [--config frames.yaml] [--set num_frames=32]   # also s3:// URIs
    python -m leanpo_core.frames --videos runs/r1/videos.parquet --frames runs/r1/frames --failures runs/r1/failed
    python -m leanpo_core.frames probe VIDEO [--num-frames 16]          # prints what would be stored
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from leanpo_core import io, schemas, sharding, stagecli
from leanpo_core.config import FramesConfig
from leanpo_core.decode import PIXELS_VERSION, probe
# toyworld.clip_frames imports it from here, and its source is part of the toy world's key: moving the import
# would make the shipped world look stale
from leanpo_core.decode import uniform_indices  # noqa: F401
from leanpo_core.decode_worker import DecodeWorker, VideoFailed
from leanpo_core.layout import table_arguments

if TYPE_CHECKING:
    import pyarrow as pa

STAGE = "frames"


def sampling_label(config: FramesConfig) -> str:
    """The `sampling` column: "uniform:16" or "fps:1.0:min2:max32"."""
    if config.sampling == "uniform":
        return f"uniform:{config.num_frames}"
    return f"fps:{config.fps:g}:min{config.min_frames}:max{config.max_frames}"


def video_key(video: str, config: FramesConfig) -> str:
    """The frames table's key of `video` under `config`: sha256 of the video path/URI and the config hash.

    The key names the path, not the bytes (hashing every video would cost a full read): replace a video by writing
    it under a new path. Any config change, operational fields included, gives new keys, so frames stored under
    another config can never be taken for current ones, nor frames an earlier decoder chain produced
    (`PIXELS_VERSION`, raised whenever the same config starts giving other pixels).
    """
    return hashlib.sha256(f"{video}\n{config.config_hash()}\n{PIXELS_VERSION}".encode()).hexdigest()[:16]


@dataclass
class FramesResult:
    """What `run_frames` wrote: one frames and one failures manifest per shard (shard order) and the counts."""

    manifests: list[io.Manifest] = field(default_factory=list)
    failure_manifests: list[io.Manifest] = field(default_factory=list)
    videos: int = 0          # distinct videos in the shards run
    decoded: int = 0         # in shards processed now
    failed: int = 0          # in shards processed now
    skipped_shards: int = 0  # already done (resume)


def _shard_done(frames_uri: str, failures_uri: str, keys: list[str], options: io.StorageOptions | None) -> bool:
    """Done: both shards and manifests are stored, and the keys they hold are the plan's."""
    if not (sharding.stored(failures_uri, options) and sharding.stored(frames_uri, options)):
        return False
    held = (sharding.column(frames_uri, schemas.FRAMES, "video_key", options)
            + sharding.column(failures_uri, schemas.FAILURES, "id", options))
    return sorted(held) == sorted(keys)


def plan_shards(videos_uri: str, config: FramesConfig, options: io.StorageOptions | None = None) -> dict[int, list]:
    """{shard index: its videos}: the distinct videos of the videos table in first-appearance order (several
    questions can share one video), `config.shard_size` per shard."""
    table = io.read_table(videos_uri, schemas.VIDEOS, options)
    return sharding.plan(list(dict.fromkeys(table.column("video").to_pylist())), config.shard_size)


def run_frames(videos_uri: str, frames_uri: str, failures_uri: str, config: FramesConfig | None = None,
               options: io.StorageOptions | None = None, shards: list[int] | None = None,
               progress: bool = True) -> FramesResult:
    """Decode every distinct video of the videos table into frames shards; failures go to the failures table.

    Shard i holds distinct videos [i * shard_size, (i + 1) * shard_size) in first-appearance order, so the plan
    depends only on the videos table and the config (`plan_shards`). `shards` limits the run to those shard indices
    (a Dask cluster runs one task per shard: tasks/data.py); disjoint subsets can run at the same time. A shard
    already done under the same config is skipped. Frames rows carry no clock time, so the same inputs give
    byte-identical frames shards; failure rows record when they happened. Object storage that cannot be read or
    written raises StorageError (the stage fails; a retry resumes at the shard).
    """
    from rich.progress import MofNCompleteColumn, Progress

    config = config or FramesConfig()
    plan = plan_shards(videos_uri, config, options)
    selected = sorted(plan) if shards is None else sorted(set(shards))
    unknown = [i for i in selected if i not in plan]
    if unknown:
        raise ValueError(f"shard(s) {unknown} do not exist: {videos_uri} plans {len(plan)} shard(s)")
    result = FramesResult(videos=sum(len(plan[i]) for i in selected))
    stored: dict[int, Future | tuple[io.Manifest, io.Manifest]] = {}
    pending: Future | None = None
    # One writer thread: Parquet encoding, hashing and upload of shard i overlap the decoding of shard i + 1
    # (pyarrow, hashlib and file/socket writes release the GIL). At most one finished shard waits in memory.
    with DecodeWorker(config, options) as worker, ThreadPoolExecutor(1, thread_name_prefix="frames-writer") as writer, \
            Progress(*Progress.get_default_columns(), MofNCompleteColumn(), disable=not progress) as bar:
        task = bar.add_task("frames", total=result.videos)
        for index in selected:
            keys = [video_key(v, config) for v in plan[index]]
            frames_shard, failures_shard = io.shard_uri(frames_uri, index), io.shard_uri(failures_uri, index)
            if _shard_done(frames_shard, failures_shard, keys, options):
                stored[index] = sharding.stored_manifests(index, frames_uri, failures_uri, options)
                result.skipped_shards += 1
                bar.advance(task, len(keys))
                continue
            rows, failures = [], []
            for video, key in zip(plan[index], keys):
                try:
                    meta, pixels = worker.decode(video)
                    rows.append({**meta, "frames": pixels, "video_key": key, "video": video,
                                 "sampling": sampling_label(config), "config_hash": config.config_hash()})
                except VideoFailed as failure:
                    failures.append(sharding.failure_row(STAGE, key, video, failure.error_type, failure.message,
                                                         failure.trace))
                bar.update(task, advance=1, description=f"frames ({result.failed + len(failures)} failed)")
            if pending is not None:
                pending.result()  # the previous shard is stored (or its error raised) before this one is queued
            pending = stored[index] = writer.submit(_store, index, rows, failures, frames_uri, failures_uri, options)
            result.decoded += len(rows)
            result.failed += len(failures)
    for index in selected:
        frames_manifest, failures_manifest = stored[index].result() if isinstance(stored[index], Future) \
            else stored[index]
        result.manifests.append(frames_manifest)
        result.failure_manifests.append(failures_manifest)
    return result


def _store(index: int, rows: list[dict], failures: list[dict], frames_uri: str, failures_uri: str,
           options: io.StorageOptions | None) -> tuple[io.Manifest, io.Manifest]:
    """Failures first, then the frames shard (sharding.write); the failures shard is written even when empty, since
    `_shard_done` reads the keys it holds."""
    return sharding.write(index, _frames_table(rows), frames_uri, schemas.FRAMES, failures, failures_uri, options,
                          empty_failures=True)


def _frames_table(rows: list[dict]) -> pa.Table:
    """The frames shard's table, its `frames` cells pointing at each row's pixels in place: pa.array would copy
    100+ MB per video (what that costs: bench/README.md, frames) before Parquet copies them again."""
    import pyarrow as pa

    table = schemas.conform([{**row, "frames": b""} for row in rows], schemas.FRAMES)
    cells = []
    for row in rows:
        data = pa.py_buffer(row["frames"])
        offsets = pa.py_buffer(np.array([0, data.size], dtype=np.int64))
        cells.append(pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, data]))
    column = table.schema.get_field_index("frames")
    return table.set_column(column, table.schema.field(column), pa.chunked_array(cells, type=pa.large_binary()))


def load_frames(frames_uri: str, video_keys: list[str] | None = None,
                options: io.StorageOptions | None = None) -> dict[str, tuple[np.ndarray, dict]]:
    """{video_key: (frames (T, H, W, 3) uint8; the row's other columns)} of the frames table (all keys by default).

    Only shards holding one of `video_keys` are downloaded; keys not found are simply absent.
    """
    store = FrameStore(frames_uri, options)
    return store.load(list(store.rows) if video_keys is None else video_keys)


def frames_metadata(row: dict, frames: np.ndarray, frame_indices: list[int] | None = None) -> dict:
    """`models.video_metadata` of a frames row's frames (or of a subset: `frame_indices` are source indices).

    Sampling hands exactly this dict to the engine and scoring/training to the processor, so every stage shows
    the model the same video; a frames folder has no rate (1 fps) and, without a stored length, is its frames.
    """
    from leanpo_core.models import video_metadata

    fps = row["fps"] if row["fps"] and row["fps"] > 0 else 1.0
    return video_metadata(frames, fps=fps, total_num_frames=row["num_frames_total"] or len(row["frame_indices"]),
                          frames_indices=row["frame_indices"] if frame_indices is None else list(frame_indices))


class FrameStore:
    """The frames table indexed without its pixels (a frames table can be many GiB); pixels one shard at a time.

    `rows`: video_key -> the row without pixels plus its `shard_uri`. The videos table names videos and the frames
    table keys them by (video, frames config), so `key_for(video)` joins the two; a video stored under two keys (two
    samplings) is ambiguous and has no key.
    """

    def __init__(self, frames_uri: str, options: io.StorageOptions | None = None):
        self.options = options
        self.rows: dict[str, dict] = {}
        self._keys: dict[str, str] = {}
        self._ambiguous: set[str] = set()
        columns = [c for c in schemas.FRAMES.columns if c != "frames"]
        for uri in io.shard_uris(frames_uri, options).values():
            for row in io.read_columns(uri, schemas.FRAMES, columns, options).to_pylist():
                self.rows.setdefault(row["video_key"], {**row, "shard_uri": uri})
                if self._keys.setdefault(row["video"], row["video_key"]) != row["video_key"]:
                    self._ambiguous.add(row["video"])

    def key_for(self, video: str) -> str | None:
        return None if video in self._ambiguous else self._keys.get(video)

    def missing_reason(self, video: str) -> str:
        if video in self._ambiguous:
            return f"the frames table holds several samplings (video_keys) of {video!r}"
        return f"no frames for {video!r} in the frames table (not extracted, or extraction failed)"

    def load(self, keys: list[str]) -> dict[str, tuple[np.ndarray, dict]]:
        """{video_key: (frames (T, H, W, 3) uint8, writable; row)} of the known `keys`, each shard read once."""
        import pyarrow as pa
        import pyarrow.compute as pc

        by_shard: dict[str, set[str]] = {}
        for key in keys:
            if key in self.rows:
                by_shard.setdefault(self.rows[key]["shard_uri"], set()).add(key)
        out = {}
        for uri, wanted in by_shard.items():
            table = io.read_table(uri, schemas.FRAMES, self.options)
            for row in table.filter(pc.is_in(table.column("video_key"), pa.array(sorted(wanted)))).to_pylist():
                pixels = row.pop("frames")
                # a writable copy: processors hand the array to torch.from_numpy
                out.setdefault(row["video_key"],
                               (np.frombuffer(pixels, dtype=np.uint8).reshape(row["frames_shape"]).copy(), row))
        return out


def main(argv: list[str] | None = None) -> None:
    """CLI: the frames stage over a videos table (leanpo_core/stagecli.py), or `probe VIDEO`: decode one video and
    print what would be stored. The earlier forms `frames run ...` and `frames VIDEO` still work."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] != "run" and not argv[0].startswith("-"):
        return _probe(argv[1:] if argv[0] == "probe" else argv)
    tables = ("videos", "frames", "failures")
    parser = stagecli.stage_parser("frames", __doc__, tables, FramesConfig)
    parser.add_argument("--shards", help="comma-separated shard indices to run (default: all)")
    args = parser.parse_args(argv[1:] if argv and argv[0] == "run" else argv)
    uris = table_arguments(parser, args, "frames", tables)
    config = stagecli.stage_config(args, FramesConfig, "frames")
    shards = [int(s) for s in args.shards.split(",")] if args.shards else None
    result = run_frames(uris["videos"], uris["frames"], uris["failures"], config, shards=shards,
                        progress=stagecli.show_progress(args))
    stagecli.report(args, [f"frames: {result.decoded} videos decoded, {result.skipped_shards} shard(s) already done "
                           f"-> {uris['frames']}", f"failures: {result.failed} videos -> {uris['failures']}"],
                    {"videos": result.videos, "decoded": result.decoded, "failed": result.failed,
                     "skipped_shards": result.skipped_shards, "frames": [m.to_dict() for m in result.manifests],
                     "failures": [m.to_dict() for m in result.failure_manifests]})
    return None


def _probe(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m leanpo_core.frames probe",
                                     description="Decode one video and print what the frames stage would store.")
    parser.add_argument("video", help="video file or frames folder (local or s3://)")
    parser.add_argument("--num-frames", type=int, default=16, help="uniformly sampled frames (default 16)")
    parser.add_argument("--decoder", choices=["auto", "decord", "pyav"], default="auto")
    args = parser.parse_args(argv)
    print(probe(args.video, FramesConfig(num_frames=args.num_frames, decoder=args.decoder)))


if __name__ == "__main__":
    from leanpo_core.launch import stage_entry

    stage_entry(main)
