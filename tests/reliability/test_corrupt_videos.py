"""The frames stage over ~65 broken inputs made from real clips, mixed with good clips: every input ends as exactly
one frames row or one failure row with its reason, nothing crashes the batch or hangs it, good clips are all decoded
to the same pixels they give alone, and whatever a decoder recovers from a damaged file is a well-formed row.

    .venv/bin/python -m pytest tests/reliability/test_corrupt_videos.py -p no:cacheprovider
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from leanpo_core import io, schemas
from leanpo_core.config import FramesConfig
from leanpo_core.decode import decode_video
from leanpo_core.frames import run_frames, video_key
from leanpo_core.videos import write_videos
from tests.reliability.corrupt import DECODED, FAILED

CONFIG = FramesConfig(num_frames=4, max_side=64, timeout_s=10.0, shard_size=16)


def _assert_well_formed(row: dict, config: FramesConfig) -> None:
    t, h, w, c = row["frames_shape"]
    assert len(row["frames"]) == t * h * w * c and c == 3 and t >= 1 and max(h, w) <= config.max_side, row["video"]
    assert t == len(row["frame_indices"]) == len(row["timestamps"]), row["video"]
    indices = row["frame_indices"]
    assert indices == sorted(set(indices)) and 0 <= indices[0] and indices[-1] < row["num_frames_total"], row
    assert row["width"] > 0 and row["height"] > 0 and math.isfinite(row["fps"]) and row["fps"] >= 0, row["video"]


@pytest.mark.parametrize("sampling", ["uniform", "fps"])
def test_every_broken_input_is_one_row_and_good_clips_decode(clips, tmp_path, sampling):
    config = CONFIG.model_copy(update={"sampling": sampling, "fps": 2.0, "max_frames": 6})
    variants = clips["variants"]
    if sampling == "fps":  # the hanging inputs cost a timeout each; once (uniform) is enough
        variants = {k: v for k, v in variants.items() if not k.startswith(("fifo", "dev_"))}
    good = clips["good"]
    order = [path for path, _ in variants.values()]
    for i, clip in enumerate(good):  # good clips spread over the shards, before and after the hanging ones
        order.insert(i * len(order) // len(good), clip)
    rows = [{"id": f"q{i}", "video": v, "question": "What happens?", "answer": "x"} for i, v in enumerate(order)]
    write_videos(rows, str(tmp_path / "videos.parquet"))

    result = run_frames(str(tmp_path / "videos.parquet"), str(tmp_path / "frames"), str(tmp_path / "failures"),
                        config, progress=False)

    frames = io.read_dataset(str(tmp_path / "frames"), schemas.FRAMES).to_pylist()
    failures = io.read_dataset(str(tmp_path / "failures"), schemas.FAILURES).to_pylist()
    decoded = {r["video"]: r for r in frames}
    failed = {r["video"]: r for r in failures}
    assert (result.videos, result.decoded, result.failed) == (len(order), len(frames), len(failures))
    assert len(decoded) == len(frames) and len(failed) == len(failures)  # one row per video
    assert sorted([*decoded, *failed]) == sorted(order) and not set(decoded) & set(failed)

    for clip in good:
        assert clip in decoded, failed.get(clip)
        alone = decode_video(clip, config)
        stored = np.frombuffer(decoded[clip]["frames"], np.uint8).reshape(decoded[clip]["frames_shape"])
        assert np.array_equal(stored, alone.frames) and decoded[clip]["frame_indices"] == alone.frame_indices
    for name, (path, expect) in variants.items():
        if expect == DECODED:
            assert path in decoded, (name, failed.get(path))
        elif expect == FAILED:
            assert path in failed, (name, decoded.get(path, {}).get("decoder"))
    for row in frames:
        _assert_well_formed(row, config)
        assert row["video_key"] == video_key(row["video"], config)
    for row in failures:
        assert row["stage"] == "frames" and row["id"] == video_key(row["video"], config)
        assert row["error_type"] and row["message"], row
    reasons = {name: failed[path]["error_type"] for name, (path, _) in variants.items() if path in failed}
    assert reasons["missing.mp4"] == reasons["dangling.mp4"] == reasons["loop.mp4"] == "FileNotFoundError"
    assert reasons["text.mp4"] == reasons["audio_aac.mp4"] == reasons["a_folder.mp4"] == "DecodeError"
    for bomb in ("sps_8192x8192.h264", "sps_16384x8192.h264"):  # refused, not decoded for minutes and gigabytes
        assert "exceeds max_source_pixels" in failed[variants[bomb][0]]["message"], failed[variants[bomb][0]]
    assert "declares no frame size" in failed[variants["sps_16384x16384.h264"][0]]["message"]
    if sampling == "uniform":
        assert reasons["fifo.mp4"] == "TimeoutError" and "timeout_s=10" in failed[variants["fifo.mp4"][0]]["message"]
    assert len(variants) >= 50
