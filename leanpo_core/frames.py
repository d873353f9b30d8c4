r"""Frames: a video becomes the (T, H, W, 3) uint8 frames the model sees, decoded once and stored in the frames table.

PyAV first: one demux pass indexes the packets, then only what the sampled frames need is decoded, in parallel
groups that seek to keyframes and skip frames nothing references, every kept frame bit-identical to a sequential
decode (measured: 3x faster than decord's get_batch for 16 frames of a 60 s 720p clip, bench/frames_bench.py).
decord when PyAV cannot open or read the file (`decoder: decord` or `pyav`: that one alone).
decord's frame timestamps are checked before it seeks: on MPEG-PS .mpg it returns wrong frames silently. A folder
of jpg/png frames, as LLaVA-Hound ships its videos, is read directly (decoder "folder"). Sampling is uniform (the
centre of each of N equal segments, as LLaVA-Video and Qwen2-VL evaluation code do) or fps-capped; frames are
downscaled inside the decoder (swscale / decord's scaler), which costs less than converting full-size frames to
RGB. A video whose header (or a later SPS) declares frames above `max_source_pixels` is refused before it is
decoded: a few KB can declare 16384x8192 frames and cost gigabytes and minutes.

The stage (`run_frames`) reads the videos table, decodes each distinct video once, and writes one frames shard and
one failures shard per `shard_size` videos. Decoding runs in one long-lived worker process, so a video that hangs
(a stalled mount, a FIFO) is killed after `timeout_s` and the batch goes on; the worker is restarted only then.

    python -m leanpo_core.frames run --videos runs/r1/videos.parquet --out runs/r1/frames \
        --failures runs/r1/failures/frames [--config frames.yaml]    # also s3:// URIs
    python -m leanpo_core.frames [probe] VIDEO [--num-frames 16]       # prints what would be stored
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import io as pyio
import json
import mmap
import os
import re
import subprocess
import sys
import tempfile
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from leanpo_core import io, schemas
from leanpo_core.config import ConfigError, FramesConfig
from leanpo_core.layout import add_table_arguments, table_arguments

if TYPE_CHECKING:
    import pyarrow as pa

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_WORKER_START_TIMEOUT_S = 120.0  # a cold start imports numpy, pyarrow, av and decord
PIXELS_VERSION = 2  # 2: PyAV first (was decord), BILINEAR (was AREA): the same config gives other pixels
# glibc serves each converted frame (340 KB at 448x252) by a fresh mmap and unmaps it when freed: 80 page faults a
# frame. Heap allocations up to 64 MB, and a heap kept up to 256 MB, halve the decode worker's system time (measured
# 24860 -> 2393 faults decoding 300 720p frames). Other C libraries ignore these; the environment's own values win.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
_DECODE_THREADS = min(4, os.cpu_count() or 1)  # parallel decoders per video (PyAV decodes without the GIL)
# Demuxers that seek by the container's own frame index, so a seek lands exactly on the keyframe asked for. Others
# (MPEG-PS/TS seek by byte-offset guesses) are decoded from the start, still skipping unreferenced frames.
_INDEXED_FORMATS = ("mov", "mp4", "matroska", "webm", "avi")


class DecodeError(RuntimeError):
    """The video could not be decoded by any backend; the message holds each backend's reason."""


@dataclass
class DecodedVideo:
    frames: np.ndarray          # (T, H, W, 3) uint8, resized so the longer side <= max_side
    frame_indices: list[int]
    timestamps: list[float]     # seconds (NaN for frame folders: they carry no clock)
    fps: float                  # 0.0 when unknown (frame folders)
    duration: float
    num_frames_total: int
    width: int                  # of the source
    height: int
    decoder: str                # decord | pyav | folder


def uniform_indices(total: int, num: int) -> list[int]:
    """Centres of `num` equal segments of `total` frames (all frames when there are fewer)."""
    if total <= num:
        return list(range(total))
    return [int((i + 0.5) * total / num) for i in range(num)]


def fps_indices(total: int, video_fps: float, config: FramesConfig) -> list[int]:
    """One frame every 1/config.fps seconds, clamped to [min_frames, max_frames] frames."""
    duration = total / video_fps if video_fps > 0 else 0.0
    wanted = int(round(duration * config.fps)) if duration else config.min_frames
    return uniform_indices(total, max(config.min_frames, min(config.max_frames, wanted)))


def sample_indices(total: int, video_fps: float, config: FramesConfig) -> list[int]:
    if config.sampling == "uniform":
        return uniform_indices(total, config.num_frames)
    return fps_indices(total, video_fps, config)


def sampling_label(config: FramesConfig) -> str:
    """The `sampling` column: "uniform:16" or "fps:1.0:min2:max32"."""
    if config.sampling == "uniform":
        return f"uniform:{config.num_frames}"
    return f"fps:{config.fps:g}:min{config.min_frames}:max{config.max_frames}"


def output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) after downscaling so the longer side is at most max_side, aspect kept; never upscales."""
    scale = max_side / max(width, height)
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _check_size(width: int, height: int, config: FramesConfig) -> None:
    """Refuse a frame size the header does not give, or one above `max_source_pixels`, before anything is decoded."""
    if not width or not height:
        raise DecodeError(f"the header declares no frame size ({width}x{height})")
    if width * height > config.max_source_pixels:
        raise DecodeError(f"declared frame size {width}x{height} exceeds max_source_pixels={config.max_source_pixels}"
                          " (a decompression bomb, or raise the limit)")


def _stream_size(path: str, config: FramesConfig) -> tuple[int, int]:
    import av

    try:
        with av.open(path) as container:  # reads the header only
            context = container.streams.video[0].codec_context
            width, height = context.width, context.height
    except Exception as exc:
        raise DecodeError(f"unreadable header ({type(exc).__name__}: {exc})") from exc
    _check_size(width, height, config)
    return width, height


def _empty(shape: tuple[int, ...]) -> np.ndarray:
    return np.empty(shape, np.uint8)


Allocate = Callable[[tuple[int, ...]], np.ndarray]  # where a backend puts the (T, H, W, 3) uint8 frames it returns


def _decode_decord(path: str, config: FramesConfig, allocate: Allocate = _empty) -> DecodedVideo:
    import decord

    # decord exposes no frame size before decoding, so PyAV reads it from the header to let decord's own scaler
    # produce the output size (a separate resize of full-size RGB frames costs more than the decode).
    width, height = _stream_size(path, config)
    out_w, out_h = output_size(width, height, config.max_side)
    reader = decord.VideoReader(path, ctx=decord.cpu(0), width=out_w, height=out_h, num_threads=1)
    total, fps = len(reader), float(reader.get_avg_fps() or 0.0)
    if total == 0:
        raise DecodeError("decord: no frames")
    indices = sample_indices(total, fps, config)
    stamps = np.asarray(reader.get_frame_timestamp(indices), dtype=np.float64).reshape(-1, 2)[:, 0]
    # decord seeks by these timestamps; garbage (MPEG-PS gives -1e14) means get_batch returns the wrong frames.
    if not (np.isfinite(stamps).all() and stamps.min() > -1.0 and (np.diff(stamps) > 0).all()):
        raise DecodeError(f"decord: unreliable frame timestamps {stamps[:3].tolist()}, its seeks would be wrong")
    batch = reader.get_batch(indices).asnumpy()
    frames = allocate(batch.shape)
    frames[...] = batch
    return DecodedVideo(frames, indices, stamps.tolist(), fps, total / fps if fps else 0.0, total, width, height,
                        "decord")


def _decode_pyav(path: str, config: FramesConfig, allocate: Allocate = _empty) -> DecodedVideo:
    """PyAV: one demux pass indexes the packets (no decoding), then only what the sampled frames need is decoded.

    With presentation timestamps on every packet (MP4, MKV, WebM, most streams), the sampled frames are split into
    contiguous groups decoded in parallel, each on its own demuxer: a group seeks to the keyframe before its next
    frame whenever that keyframe is ahead of what it has read, and packets of frames nobody kept are decoded with
    skip_frame NONREF (frames no other frame references are not decoded at all). Both leave every kept frame
    bit-identical to a plain sequential decode; a sampled frame the indexed pass did not produce (a seek the
    container does not honour, a damaged packet) sends the video through the plain sequential decode instead.
    """
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        _check_size(stream.codec_context.width, stream.codec_context.height, config)
        packets = [(packet.pts, packet.is_keyframe) for packet in container.demux(stream) if packet.size]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        width, height = stream.codec_context.width, stream.codec_context.height
        seekable = any(name in _INDEXED_FORMATS for name in container.format.name.split(","))
    total = len(packets)
    if total == 0:
        raise DecodeError("pyav: no video packets")
    indices = sample_indices(total, fps, config)
    out_w, out_h = output_size(width, height, config.max_side)
    order = sorted(pts for pts, _ in packets) if all(pts is not None for pts, _ in packets) else []
    picked = None
    if order and len(set(order)) == total:  # every packet stamped, no two alike: pts <-> presentation index
        keyframes = {pts for pts, key in packets if key} if seekable else set()
        picked = _decode_indexed(path, order, keyframes, indices, (out_w, out_h), config, allocate)
    if picked is None:
        picked = _decode_sequential(path, indices, (out_w, out_h), config, allocate)
    kept, frames, times = picked
    if not kept:
        raise DecodeError("pyav: no decodable frames")
    stamps = [(start if t is None else t) - start for t in times]  # seconds from the stream's start, as decord
    return DecodedVideo(frames, kept, stamps, fps, total / fps if fps else 0.0, total, width,
                        height, "pyav")


def _to_rgb(frame, size: tuple[int, int]) -> np.ndarray:
    """Scale and convert in one swscale pass, without the GIL. swscale's BILINEAR widens its kernel when it
    downscales (antialiased: 1-pixel stripes become flat grey, std 8 over a row vs 25 with AREA, 74 with
    FAST_BILINEAR, tests/leanpo_core/test_frames.py) and costs less than AREA (1.2 vs 2 ms a 720p frame here)."""
    return frame.to_ndarray(width=size[0], height=size[1], format="rgb24", interpolation="BILINEAR")


def _decode_indexed(path: str, order: list[int], keyframes: set[int], indices: list[int], size: tuple[int, int],
                    config: FramesConfig, allocate: Allocate = _empty,
                    ) -> tuple[list[int], np.ndarray, list[float | None]] | None:
    """(indices, frames, times) of the sampled frames by seeks and skips, or None when one of them was not found.

    `order`: every packet's pts in presentation order; `keyframes`: pts of the keyframes to seek to (none: decode
    from the start). Frames convert on a pool of their own, so decoding and conversion overlap, straight into the
    allocated array (no second copy of the video's frames is ever held).
    """
    import av

    keys = [i for i, pts in enumerate(order) if pts in keyframes] or [0]
    groups = _gop_groups(indices, keys, _DECODE_THREADS)
    threads = max(1, _DECODE_THREADS // len(groups))  # one group (one GOP): the decoder's own frame threads
    found: dict[int, tuple[Future, float | None]] = {}
    slots = threading.BoundedSemaphore(4 * _DECODE_THREADS)  # decoded frames waiting for conversion, at most
    rows = {index: row for row, index in enumerate(indices)}
    frames = allocate((len(indices), size[1], size[0], 3))

    def convert(frame, index: int) -> None:
        try:
            frames[rows[index]] = _to_rgb(frame, size)
        finally:
            slots.release()

    with ThreadPoolExecutor(_DECODE_THREADS, thread_name_prefix="pyav-rgb") as converter:
        def submit(frame, index: int) -> Future:
            slots.acquire()
            return converter.submit(convert, frame, index)

        try:
            with ThreadPoolExecutor(len(groups), thread_name_prefix="pyav-group") as pool:
                for part in pool.map(lambda g: _decode_group(path, order, keys, g, submit, threads, config), groups):
                    found.update(part)
        except av.error.FFmpegError:
            return None  # a seek or read the container refused: the sequential decode says what is wrong, if anything
        if len(found) != len(set(indices)):
            return None
        for converted, _ in found.values():
            converted.result()  # raises what a conversion raised
        return list(indices), frames, [found[i][1] for i in indices]


def _gop_groups(indices: list[int], keys: list[int], parts: int) -> list[list[int]]:
    """Split sorted `indices` into at most `parts` contiguous groups of about equal decoding work, cutting only
    between GOPs (a group that started inside another's GOP would decode that GOP's head a second time)."""
    runs: list[list[int]] = []
    for index in indices:
        keyframe = keys[bisect.bisect_right(keys, index) - 1]
        if runs and keys[bisect.bisect_right(keys, runs[-1][0]) - 1] == keyframe:
            runs[-1].append(index)
        else:
            runs.append([index])
    cost = [run[-1] - keys[bisect.bisect_right(keys, run[0]) - 1] + 1 for run in runs]  # frames decoded, at most
    share, groups, spent = sum(cost) / parts, [[]], 0.0
    for run, c in zip(runs, cost):
        if groups[-1] and spent >= share * len(groups) and len(groups) < parts:
            groups.append([])
        groups[-1].extend(run)
        spent += c
    return groups


def _decode_group(path: str, order: list[int], keys: list[int], targets: list[int], submit, threads: int,
                  config: FramesConfig) -> dict[int, tuple[Future, float | None]]:
    """{index: (its conversion, time)} of `targets` (sorted presentation indices), on a demuxer of its own."""
    import av

    wanted = {order[i]: i for i in targets}
    position = {pts: i for i, pts in enumerate(order)}
    found: dict[int, tuple[Future, float | None]] = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        context = stream.codec_context
        read, next_target = -1, 0  # highest presentation index demuxed; first target not yet found

        def keyframe_before(index: int) -> int:
            return keys[bisect.bisect_right(keys, index) - 1]

        while next_target < len(targets):
            keyframe = keyframe_before(targets[next_target])
            if keyframe > read and (keyframe > 0 or read >= 0):  # the stream starts at keyframe 0 anyway
                container.seek(order[keyframe], stream=stream, backward=True, any_frame=False)
            seek_again = False
            for packet in container.demux(stream):
                if packet.size:
                    read = max(read, position.get(packet.pts, read))
                    context.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
                try:
                    decoded = packet.decode()  # the empty packet at the end flushes the decoder
                except av.error.InvalidDataError:
                    continue
                advanced = False
                for frame in decoded:
                    _check_size(frame.width, frame.height, config)  # an SPS mid-stream may declare another size
                    index = wanted.get(frame.pts)
                    if index is not None and index not in found:
                        found[index] = (submit(frame, index), frame.time)
                while next_target < len(targets) and targets[next_target] in found:
                    next_target, advanced = next_target + 1, True
                if next_target == len(targets):
                    break
                if advanced and keyframe_before(targets[next_target]) > read:
                    seek_again = True  # the next frame lies past a keyframe not read yet: jump there
                    break
            if not seek_again:
                break  # end of stream: whatever is still missing was not decodable this way
    return found


def _decode_sequential(path: str, indices: list[int], size: tuple[int, int], config: FramesConfig,
                       allocate: Allocate = _empty) -> tuple[list[int], np.ndarray, list[float | None]]:
    """Every frame in order up to the last sampled one, counting frames as they come out (no timestamps needed)."""
    import av

    wanted, frames, times, index = set(indices), [], [], 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for packet in container.demux(stream):
            try:
                decoded = packet.decode()
            except av.error.InvalidDataError:
                continue  # a corrupt packet: keep going, the remaining frames usually decode
            for frame in decoded:
                _check_size(frame.width, frame.height, config)  # an SPS mid-stream may declare another size
                if index in wanted:
                    frames.append(_to_rgb(frame, size))
                    times.append(frame.time)
                index += 1
            if index > indices[-1]:
                break  # past the last wanted frame: decoding the tail would only be thrown away
    kept = [i for i in indices if i < index][: len(frames)]
    return kept, np.stack(frames, out=allocate((len(frames), size[1], size[0], 3))) if frames else \
        np.zeros((0, size[1], size[0], 3), np.uint8), times


def decode_video(path: str, config: FramesConfig | None = None, allocate: Allocate = _empty) -> DecodedVideo:
    """Decode the sampled frames of a local video file with `config.decoder`'s backends in order (auto: PyAV, then
    decord); DecodeError names each backend's reason when none can."""
    config = config or FramesConfig()
    backends = {"decord": [_decode_decord], "pyav": [_decode_pyav], "auto": [_decode_pyav, _decode_decord]}
    reasons = []
    for backend in backends[config.decoder]:
        try:
            return backend(path, config, allocate)
        except Exception as exc:  # decord raises DECORDError, which is not a RuntimeError subclass
            reasons.append(f"{backend.__name__.removeprefix('_decode_')}: {type(exc).__name__}: {exc}")
    raise DecodeError(f"cannot decode {path}: " + "; ".join(reasons))


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def decode_folder(folder: str, config: FramesConfig | None = None, options: io.StorageOptions | None = None,
                  allocate: Allocate = _empty) -> DecodedVideo:
    """Sample a folder of extracted frames (jpg/png, in natural name order), local or on S3."""
    from PIL import Image

    config = config or FramesConfig()
    fs, path = io.filesystem(folder, options)
    with _storage(folder, options):
        listing = fs.ls(path, detail=False)
    names = sorted((p for p in listing if p.lower().endswith(_IMAGE_SUFFIXES)),
                   key=lambda p: _natural_key(p.rsplit("/", 1)[-1]))
    if not names:
        raise DecodeError(f"folder: no {'/'.join(_IMAGE_SUFFIXES)} images in {folder}")
    indices = sample_indices(len(names), 0.0, config)  # no frame rate: fps sampling falls back to min_frames
    images = []
    for i in indices:
        with _storage(folder, options):
            data = fs.cat_file(names[i])
        images.append(Image.open(pyio.BytesIO(data)).convert("RGB"))
    width, height = images[0].size
    size = output_size(width, height, config.max_side)
    frames = np.stack([np.asarray(im if im.size == size else im.resize(size, Image.BICUBIC)) for im in images],
                      out=allocate((len(images), size[1], size[0], 3)))
    return DecodedVideo(frames, indices, [float("nan")] * len(indices), 0.0, 0.0, len(names), width, height,
                        "folder")


def _storage(uri: str, options: io.StorageOptions | None) -> contextlib.AbstractContextManager:
    """Around each read from object storage: a storage failure (endpoint down, access denied) becomes a StorageError,
    which fails the stage so that a retry redoes the shard; recorded as the video's failure row instead, it would
    never be retried (a resume skips finished shards). A missing object stays the video's own FileNotFoundError.
    Local reads fail per video, as they are."""
    if isinstance(io.filesystem(uri, options)[0], LocalFileSystem):
        return contextlib.nullcontext()
    return io.storage_errors("read", uri, options, missing_ok=True)


def decode(video: str, config: FramesConfig | None = None, options: io.StorageOptions | None = None,
           allocate: Allocate = _empty) -> DecodedVideo:
    """Decode any input the videos table may name: a video file or a frames folder, local or s3://. `allocate`
    gives the array the frames are written to (the decode worker's shared memory)."""
    config = config or FramesConfig()
    fs, path = io.filesystem(video, options)
    with _storage(video, options):
        found, folder = fs.exists(path), fs.isdir(path)
    if not found:
        raise FileNotFoundError(f"no such video file or frames folder: {video}")
    if folder:
        return decode_folder(video, config, options, allocate)
    if isinstance(fs, LocalFileSystem):
        return decode_video(path, config, allocate)
    with tempfile.TemporaryDirectory(prefix="leanpo-frames-") as tmp:  # decord and PyAV want a seekable local file
        local = os.path.join(tmp, os.path.basename(path))
        with _storage(video, options):
            fs.get_file(path, local)
        return decode_video(local, config, allocate)


def video_key(video: str, config: FramesConfig) -> str:
    """The frames table's key of `video` under `config`: sha256 of the video path/URI and the config hash.

    The key names the path, not the bytes (hashing every video would cost a full read): replace a video by writing
    it under a new path. Any config change, operational fields included, gives new keys, so frames stored under
    another config can never be taken for current ones, nor frames an earlier decoder chain produced
    (`PIXELS_VERSION`, raised whenever the same config starts giving other pixels).
    """
    return hashlib.sha256(f"{video}\n{config.config_hash()}\n{PIXELS_VERSION}".encode()).hexdigest()[:16]


class VideoFailed(Exception):
    """One video could not be turned into frames; carries what the failures table records."""

    def __init__(self, error_type: str, message: str, trace: str | None = None):
        super().__init__(f"{error_type}: {message}")
        self.error_type, self.message, self.trace = error_type, message, trace


class _SharedFrames:
    """Allocates a video's frames in an anonymous shared-memory file (Linux memfd) whose descriptor then goes to
    the parent: the decoder writes the pixels once and the parent's Parquet writer reads them in place (through a
    pipe, 100 MB cost 0.7 s of copies). Unlike /dev/shm (64 MB in a default Docker or Kubernetes container), a memfd
    is limited only by memory. Where memfd does not exist, frames are plain arrays and go through the pipe."""

    available = hasattr(os, "memfd_create")

    def __init__(self):
        self.fd: int | None = None
        self.map: mmap.mmap | None = None

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        if not self.available or size == 0:
            return np.empty(shape, np.uint8)
        self.release()  # a backend that failed after allocating
        self.fd = os.memfd_create("leanpo-frames", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))  # one fault
        return np.ndarray(shape, np.uint8, buffer=self.map)

    def holds(self, frames: np.ndarray) -> bool:
        return self.map is not None and frames.nbytes == len(self.map) and \
            np.shares_memory(frames, np.frombuffer(self.map, np.uint8))

    def release(self) -> None:
        if self.map is not None:
            with contextlib.suppress(BufferError):  # an array over it is still referenced (a failed backend's
                self.map.close()                    # traceback): the mapping goes when that array does
            os.close(self.fd)
        self.fd = self.map = None


def _worker_main(fd: int) -> None:
    """The decode worker's loop: receives (config, options) once, then video URIs; answers meta + raw frames (the
    descriptor of a memfd holding them, or their bytes)."""
    from multiprocessing.reduction import send_handle

    conn = Connection(fd)
    config_json, options = conn.recv()
    config = FramesConfig.model_validate_json(config_json)
    import av  # noqa: F401  imported before "ready", so no video's time limit pays for it
    import decord  # noqa: F401

    conn.send("ready")
    shared = _SharedFrames()
    while (video := conn.recv()) is not None:
        try:
            decoded = decode(video, config, options, allocate=shared)
        except Exception as exc:
            shared.release()
            conn.send(("error", type(exc).__name__, str(exc), traceback.format_exc()))
            continue
        meta = {f.name: getattr(decoded, f.name) for f in fields(decoded) if f.name != "frames"}
        meta["frames_shape"] = list(decoded.frames.shape)
        if shared.holds(decoded.frames):
            del decoded  # the last array over the map: it can be closed once the parent holds the descriptor
            conn.send(("ok", meta, "memfd"))
            send_handle(conn, shared.fd, os.getppid())
        else:
            frames = np.ascontiguousarray(decoded.frames)
            del decoded
            conn.send(("ok", meta, "bytes"))
            conn.send_bytes(memoryview(frames).cast("B"))  # raw, unpickled: becomes the `frames` cell as it is
            del frames
        shared.release()


def _receive_pixels(conn: Connection, reply: tuple) -> bytes | memoryview:
    """The frames the worker announced in `reply`: a read-only view of its memfd (mapped, prefaulted, its descriptor
    closed: the memory goes when the view does), or the bytes it sent."""
    from multiprocessing.reduction import recv_handle

    if reply[2] != "memfd":
        return conn.recv_bytes()
    fd = recv_handle(conn)
    try:
        size = int(np.prod(reply[1]["frames_shape"]))
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return memoryview(mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ))
    finally:
        os.close(fd)


class DecodeWorker:
    """One long-lived decode process, used for every video of a run and replaced only after a timeout or crash.

    A process per video would cost a ~0.3 s interpreter start each; a thread cannot be killed when a decoder hangs
    inside C code. The worker is a fresh `python -m leanpo_core.frames _worker` (not a fork: the parent may hold
    threads, e.g. s3fs's event loop, and not multiprocessing's spawn: that re-imports the caller's __main__).
    """

    def __init__(self, config: FramesConfig, options: io.StorageOptions | None = None):
        self.config, self.options = config, options
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None

    def __enter__(self) -> DecodeWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the worker and wait until it has imported its decoders (done lazily by `decode` otherwise)."""
        import socket

        parent, child = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[1])
        env = {**_MALLOC_ENV, **os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen([sys.executable, "-m", "leanpo_core.frames", "_worker", str(child.fileno())],
                                      pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, env=env)
        child.close()
        self._conn = Connection(parent.detach())
        self._conn.send((self.config.model_dump_json(), self.options))
        if not self._conn.poll(_WORKER_START_TIMEOUT_S):
            self.close()
            raise RuntimeError(f"the frames decode worker did not start within {_WORKER_START_TIMEOUT_S:.0f} s")
        try:
            self._conn.recv()
        except EOFError:
            code = self._proc.wait()
            self.close()
            raise RuntimeError(f"the frames decode worker exited with code {code} at start (its stderr says why)") \
                from None

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()  # SIGKILL: a decoder stuck in C ignores anything gentler
            self._proc.wait()
            self._conn.close()
        self._proc = self._conn = None

    def decode(self, video: str) -> tuple[dict, bytes | memoryview]:
        """(metadata, raw frames bytes) of `video`; raises VideoFailed (error, timeout or crash of the worker), or
        StorageError when object storage could not be read (not the video's fault: the stage should fail)."""
        if self._proc is None:
            self.start()
        try:
            self._conn.send(video)
        except OSError:  # the idle worker died since the last video (e.g. the OOM killer): start another
            self.close()
            self.start()
            self._conn.send(video)
        if not self._conn.poll(self.config.timeout_s):
            self.close()
            raise VideoFailed("TimeoutError", f"decoding took longer than timeout_s={self.config.timeout_s:g} s; "
                              "the decode worker was killed")
        try:
            reply = self._conn.recv()
            pixels = _receive_pixels(self._conn, reply) if reply[0] == "ok" else b""
        except (EOFError, OSError):
            code = self._proc.wait()
            self.close()
            raise VideoFailed("WorkerCrashed", f"the decode worker died (exit code {code}) while decoding") from None
        if reply[0] == "error" and reply[1] == io.StorageError.__name__:
            raise io.StorageError(reply[2])  # the storage, not the video: fail the stage, do not record it
        if reply[0] == "error":
            raise VideoFailed(*reply[1:])
        return reply[1], pixels


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
    """Done: both shards and manifests exist, the manifest describes the stored bytes, and the keys match the plan."""
    try:
        for uri in (failures_uri, frames_uri):
            manifest = io.read_manifest(uri, options)
            fs, path = io.filesystem(uri, options)
            if fs.size(path) != manifest.bytes:  # killed between table and manifest: the manifest is stale
                return False
    except FileNotFoundError:
        return False
    # one column each by ranged reads: a resume check must not download every shard's pixels
    stored = (io.read_columns(frames_uri, schemas.FRAMES, ["video_key"], options).column("video_key").to_pylist()
              + io.read_columns(failures_uri, schemas.FAILURES, ["id"], options).column("id").to_pylist())
    return sorted(stored) == sorted(keys)


def _failure_row(video: str, key: str, failure: VideoFailed) -> dict:
    return {"stage": "frames", "id": key, "video": video, "error_type": failure.error_type,
            "message": failure.message, "traceback": failure.trace, "attempt": 1,
            "created_at": datetime.now(timezone.utc)}


def run_frames(videos_uri: str, frames_uri: str, failures_uri: str, config: FramesConfig | None = None,
               options: io.StorageOptions | None = None, shards: list[int] | None = None,
               progress: bool = True) -> FramesResult:
    """Decode every distinct video of the videos table into frames shards; failures go to the failures table.

    Shard i holds distinct videos [i * shard_size, (i + 1) * shard_size) in first-appearance order, so the plan
    depends only on the videos table and the config. `shards` limits the run to those shard indices (for mapping
    shards over workers). A shard already done under the same config is skipped. Frames rows carry no clock
    time, so the same inputs give byte-identical frames shards; failure rows record when they happened. Object
    storage that cannot be read or written raises StorageError (the stage fails; a retry resumes at the shard).
    """
    from rich.progress import MofNCompleteColumn, Progress

    config = config or FramesConfig()
    table = io.read_table(videos_uri, schemas.VIDEOS, options)
    videos = list(dict.fromkeys(table.column("video").to_pylist()))  # several questions can share one video
    size = config.shard_size
    plan = {i: videos[i * size:(i + 1) * size] for i in range((len(videos) + size - 1) // size)}
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
                stored[index] = (io.read_manifest(frames_shard, options), io.read_manifest(failures_shard, options))
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
                    failures.append(_failure_row(video, key, failure))
                bar.update(task, advance=1, description=f"frames ({result.failed + len(failures)} failed)")
            if pending is not None:
                pending.result()  # the previous shard is stored (or its error raised) before this one is queued
            pending = stored[index] = writer.submit(_write_pair, index, rows, failures, frames_uri, failures_uri,
                                                    options)
            result.decoded += len(rows)
            result.failed += len(failures)
    for index in selected:
        frames_manifest, failures_manifest = stored[index].result() if isinstance(stored[index], Future) \
            else stored[index]
        result.manifests.append(frames_manifest)
        result.failure_manifests.append(failures_manifest)
    return result


def _write_pair(index: int, rows: list[dict], failures: list[dict], frames_uri: str, failures_uri: str,
                options: io.StorageOptions | None) -> tuple[io.Manifest, io.Manifest]:
    """Failures first: the frames manifest, written last, is what marks the shard done."""
    failures_manifest = io.write_shard(failures, failures_uri, schemas.FAILURES, index, options)
    return io.write_shard(_frames_table(rows), frames_uri, schemas.FRAMES, index, options), failures_manifest


def _frames_table(rows: list[dict]) -> pa.Table:
    """The frames shard's table, its `frames` cells pointing at each row's pixels in place: pa.array would copy
    100+ MB per video (0.3 s each on the 2-core VM) before Parquet copies them again."""
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


def _load_config(path: str | None) -> FramesConfig:
    """A FramesConfig from a YAML/JSON file holding either its fields or a pipeline config's `frames:` section."""
    if path is None:
        return FramesConfig()
    import yaml
    from pydantic import ValidationError

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}  # YAML is a superset of JSON
        return FramesConfig.model_validate(data.get("frames", data) if isinstance(data, dict) else data)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"invalid frames config {path}:\n{exc}") from exc


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:  # internal: the decode worker DecodeWorker starts
        return _worker_main(int(argv[1]))
    if argv and argv[0] not in ("run", "probe") and not argv[0].startswith("-"):
        argv = ["probe", *argv]  # the single-video form `python -m leanpo_core.frames VIDEO` keeps working
    parser = argparse.ArgumentParser(prog="python -m leanpo_core.frames", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the frames stage over a videos table")
    tables = ("videos", "frames", "failures")
    add_table_arguments(run, "frames", tables)
    run.add_argument("--out", dest="frames", help=argparse.SUPPRESS)  # the flag's earlier name
    run.add_argument("--config", help="YAML/JSON with FramesConfig fields or a pipeline config's frames: section")
    run.add_argument("--shards", help="comma-separated shard indices to run (default: all)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    probe = commands.add_parser("probe", help="decode one video and print what would be stored")
    probe.add_argument("video", help="video file or frames folder (local or s3://)")
    probe.add_argument("--num-frames", type=int, default=16, help="uniformly sampled frames (default 16)")
    probe.add_argument("--decoder", choices=["auto", "decord", "pyav"], default="auto")
    args = parser.parse_args(argv)
    if args.command == "probe":
        video = decode(args.video, FramesConfig(num_frames=args.num_frames, decoder=args.decoder))
        print(f"{args.video}: {video.decoder}, {video.num_frames_total} frames at {video.fps:.2f} fps, "
              f"{video.width}x{video.height}; kept {video.frames.shape} at indices {video.frame_indices}")
        return None
    shards = [int(s) for s in args.shards.split(",")] if args.shards else None
    uris = table_arguments(run, args, "frames", tables)
    result = run_frames(uris["videos"], uris["frames"], uris["failures"], _load_config(args.config), shards=shards,
                        progress=not args.no_progress)
    print(json.dumps({"videos": result.videos, "decoded": result.decoded, "failed": result.failed,
                      "skipped_shards": result.skipped_shards,
                      "frames": [m.to_dict() for m in result.manifests],
                      "failures": [m.to_dict() for m in result.failure_manifests]}, indent=2))
    return None


if __name__ == "__main__":
    from leanpo_core.launch import stage_entry

    stage_entry(main)
