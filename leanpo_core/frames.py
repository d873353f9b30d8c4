"""Frames: a video becomes the (T, H, W, 3) uint8 frames the model sees, with the indices that were sampled.

decord first (random access, fast seeks); PyAV when decord cannot open or read the file (some real files, e.g.
mpeg1 or theora, decode only with PyAV; PyAV also skips corrupt packets where decord stops). Sampling is uniform
(the centre of each of N equal segments, as LLaVA-Video and Qwen2-VL evaluation code do) or fps-capped.

    python -m leanpo_core.frames VIDEO [--num-frames 16]      # prints what would be stored
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from leanpo_core.config import FramesConfig


class DecodeError(RuntimeError):
    """The video could not be decoded by any backend; the message holds each backend's reason."""


@dataclass
class DecodedVideo:
    frames: np.ndarray          # (T, H, W, 3) uint8, resized so the longer side <= max_side
    frame_indices: list[int]
    timestamps: list[float]     # seconds
    fps: float
    duration: float
    num_frames_total: int
    width: int                  # of the source
    height: int
    decoder: str


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


def resize_longer_side(frames: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale (T, H, W, 3) so max(H, W) <= max_side, keeping the aspect ratio; never upscales."""
    height, width = frames.shape[1:3]
    scale = max_side / max(height, width)
    if scale >= 1:
        return frames
    from PIL import Image

    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in frames])


def _decode_decord(path: str, config: FramesConfig) -> DecodedVideo:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    total, fps = len(reader), float(reader.get_avg_fps() or 0.0)
    if total == 0:
        raise DecodeError("decord: no frames")
    indices = sample_indices(total, fps, config)
    frames = reader.get_batch(indices).asnumpy()
    stamps = [float(reader.get_frame_timestamp(i)[0]) for i in indices]
    height, width = frames.shape[1:3]
    return DecodedVideo(resize_longer_side(frames, config.max_side), indices, stamps, fps,
                        total / fps if fps else 0.0, total, width, height, "decord")


def _decode_pyav(path: str, config: FramesConfig) -> DecodedVideo:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        total = sum(1 for packet in container.demux(stream) if packet.size)  # counts without decoding
    if total == 0:
        raise DecodeError("pyav: no video packets")
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        indices = sample_indices(total, fps, config)
        wanted, frames, stamps, index = set(indices), [], [], 0
        for packet in container.demux(stream):
            try:
                decoded = packet.decode()
            except av.error.InvalidDataError:
                continue  # a corrupt packet: keep going, the remaining frames usually decode
            for frame in decoded:
                if index in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    stamps.append(float(frame.time or 0.0))
                index += 1
    if not frames:
        raise DecodeError("pyav: no decodable frames")
    kept = [i for i in indices if i < index][: len(frames)]
    array = np.stack(frames)
    height, width = array.shape[1:3]
    return DecodedVideo(resize_longer_side(array, config.max_side), kept, stamps, fps,
                        total / fps if fps else 0.0, total, width, height, "pyav")


def decode_video(path: str, config: FramesConfig | None = None) -> DecodedVideo:
    """Decode the sampled frames of a local video file, decord first, PyAV as the fallback."""
    config = config or FramesConfig()
    backends = {"decord": [_decode_decord], "pyav": [_decode_pyav], "auto": [_decode_decord, _decode_pyav]}
    reasons = []
    for backend in backends[config.decoder]:
        try:
            return backend(path, config)
        except Exception as exc:  # decord raises DECORDError, which is not a RuntimeError subclass
            reasons.append(f"{backend.__name__.removeprefix('_decode_')}: {type(exc).__name__}: {exc}")
    raise DecodeError(f"cannot decode {path}: " + "; ".join(reasons))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", help="path to a video file")
    parser.add_argument("--num-frames", type=int, default=16, help="uniformly sampled frames (default 16)")
    parser.add_argument("--decoder", choices=["auto", "decord", "pyav"], default="auto")
    args = parser.parse_args(argv)
    video = decode_video(args.video, FramesConfig(num_frames=args.num_frames, decoder=args.decoder))
    print(f"{args.video}: {video.decoder}, {video.num_frames_total} frames at {video.fps:.2f} fps, "
          f"{video.width}x{video.height}; kept {video.frames.shape} at indices {video.frame_indices}")


if __name__ == "__main__":
    main()
