r"""Decode: a video file or a folder of frames becomes the sampled (T, H, W, 3) uint8 frames the model sees.

PyAV first: one demux pass indexes the packets, then only what the sampled frames need is decoded, in parallel
groups that seek to keyframes and skip frames nothing references, every kept frame bit-identical to a sequential
decode (for a few frames of a long clip, much faster than decord's get_batch: bench/README.md, frames).
decord when PyAV cannot open or read the file (`decoder: decord` or `pyav`: that one alone).
decord's frame timestamps are checked before it seeks: on MPEG-PS .mpg it returns wrong frames silently. A folder
of jpg/png frames, as LLaVA-Hound ships its videos, is read directly (decoder "folder"). Sampling is uniform (the
centre of each of N equal segments, as LLaVA-Video and Qwen2-VL evaluation code do) or fps-capped; frames are
downscaled inside the decoder (swscale / decord's scaler), which costs less than converting full-size frames to
RGB. A video whose header (or a later SPS) declares frames above `max_source_pixels` is refused before it is
decoded: a few KB can declare 16384x8192 frames and cost gigabytes and minutes.

The frames stage (`leanpo_core.frames`) runs `decode` in its decode worker (`leanpo_core.decode_worker`);
`python -m leanpo_core.frames probe VIDEO` prints what `probe` says of one video.
"""

from __future__ import annotations

import bisect
import contextlib
import io as pyio
import os
import re
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from leanpo_core import io
from leanpo_core.config import FramesConfig

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PIXELS_VERSION = 2  # 2: PyAV first (was decord), BILINEAR (was AREA): the same config gives other pixels
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


def _to_rgb(frame, size: tuple[int, int], reformatter) -> np.ndarray:
    """Scale and convert in one swscale pass, without the GIL. swscale's BILINEAR widens its kernel when it
    downscales (antialiased: 1-pixel stripes become flat grey, unlike AREA or FAST_BILINEAR,
    tests/leanpo_core/test_frames.py) and costs less than AREA (bench/README.md, frames).

    `reformatter`: an `av.video.reformatter.VideoReformatter` kept by the calling thread for the whole video, so
    its swscale context is set up once; `frame.to_ndarray(width=..)` makes a new one per frame, with swscale's
    slice threads started and stopped each time (2.5x the wall time of a full decode of a 640x272 clip).
    """
    return reformatter.reformat(frame, size[0], size[1], "rgb24", interpolation="BILINEAR", threads=1).to_ndarray()


def _decode_indexed(path: str, order: list[int], keyframes: set[int], indices: list[int], size: tuple[int, int],
                    config: FramesConfig, allocate: Allocate = _empty,
                    ) -> tuple[list[int], np.ndarray, list[float | None]] | None:
    """(indices, frames, times) of the sampled frames by seeks and skips, or None when one of them was not found.

    `order`: every packet's pts in presentation order; `keyframes`: pts of the keyframes to seek to (none: decode
    from the start). Frames convert on a pool of their own, so decoding and conversion overlap, straight into the
    allocated array (no second copy of the video's frames is ever held).
    """
    import av
    from av.video.reformatter import VideoReformatter

    keys = [i for i, pts in enumerate(order) if pts in keyframes] or [0]
    groups = _gop_groups(indices, keys, _DECODE_THREADS)
    threads = max(1, _DECODE_THREADS // len(groups))  # one group (one GOP): the decoder's own frame threads
    found: dict[int, tuple[Future, float | None]] = {}
    slots = threading.BoundedSemaphore(4 * _DECODE_THREADS)  # decoded frames waiting for conversion, at most
    rows = {index: row for row, index in enumerate(indices)}
    frames = allocate((len(indices), size[1], size[0], 3))

    local = threading.local()  # a reformatter per conversion thread (one swscale context each)

    def convert(frame, index: int) -> None:
        try:
            if not hasattr(local, "reformatter"):
                local.reformatter = VideoReformatter()
            frames[rows[index]] = _to_rgb(frame, size, local.reformatter)
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
    from av.video.reformatter import VideoReformatter

    wanted, frames, times, index = set(indices), [], [], 0
    reformatter = VideoReformatter()
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
                    frames.append(_to_rgb(frame, size, reformatter))
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


def probe(video: str, config: FramesConfig | None = None, options: io.StorageOptions | None = None) -> str:
    """One line on what `decode` makes of `video`: the decoder, the source's frames, rate and size, and the kept
    frames' shape and indices."""
    decoded = decode(video, config, options)
    return (f"{video}: {decoded.decoder}, {decoded.num_frames_total} frames at {decoded.fps:.2f} fps, "
            f"{decoded.width}x{decoded.height}; kept {decoded.frames.shape} at indices {decoded.frame_indices}")
