"""The lean augmented view: drawn once, applied identically to every frame, reproducible, within its ranges."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leanpo_core import augment
from leanpo_core.config import SampleConfig

CONFIG = SampleConfig(model="m")


@pytest.fixture(scope="module")
def clip():
    """16 distinct random frames (16, 48, 64, 3) and their source indices 0, 3, ..., 45."""
    return np.random.default_rng(0).integers(0, 256, (16, 48, 64, 3), dtype=np.uint8), list(range(0, 48, 3))


def test_same_seed_same_view_other_seed_other_view(clip):
    frames, indices = clip
    a, b = augment.lean_view(frames, indices, CONFIG, seed=7), augment.lean_view(frames, indices, CONFIG, seed=7)
    assert np.array_equal(a.frames, b.frames) and a.params == b.params
    c = augment.lean_view(frames, indices, CONFIG, seed=8)
    assert c.params != a.params and not np.array_equal(c.frames, a.frames)


def test_subsamples_uniformly_and_reports_source_indices(clip):
    """16 frames to 2: the centres of two 8-frame segments, positions 4 and 12 = source frames 12 and 36."""
    frames, indices = clip
    view = augment.lean_view(frames, indices, CONFIG, seed=1)
    assert view.frames.shape == (2, 48, 64, 3) and view.frames.dtype == np.uint8
    assert view.positions == [4, 12] and view.frame_indices == [12, 36]
    four = augment.lean_view(frames, indices, CONFIG.model_copy(update={"lose_frames": 4}), seed=1)
    assert four.positions == [2, 6, 10, 14] and four.frame_indices == [6, 18, 30, 42]


def test_one_transform_for_every_frame(clip):
    """Identical frames stay identical, and each frame augmented alone equals its row of the clip."""
    frames, _ = clip
    same = np.repeat(frames[:1], 6, axis=0)
    view = augment.lean_view(same, list(range(6)), CONFIG.model_copy(update={"lose_frames": 6}), seed=3)
    assert all(np.array_equal(view.frames[0], f) for f in view.frames[1:])
    params = augment.draw_params(48, 64, CONFIG, seed=5)
    whole = augment.apply_params(frames[:3], params)
    for i in range(3):
        assert np.array_equal(whole[i], augment.apply_params(frames[i:i + 1], params)[0])


def test_hflip_and_grayscale_act_as_drawn(clip):
    """With everything else neutral, the output is the (resized) crop, mirrored when hflip is drawn."""
    frames, _ = clip
    neutral = CONFIG.model_copy(update={"aug_crop_scale_min": 1.0, "aug_crop_scale_max": 1.0,
                                        "aug_color_jitter_p": 0.0, "aug_grayscale_p": 1.0, "aug_hflip_p": 1.0})
    params = augment.draw_params(48, 64, neutral, seed=0)
    params["blur"]["kernel_size"] = 1  # no blur: leave only grayscale and flip
    assert params["grayscale"] and params["hflip"] and not params["color_jitter"]["applied"]
    out = augment.apply_params(frames[:1], params)[0].astype(int)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    # area scale 1 on a 4:3 frame can only be the whole frame (the fallback crop), so compare pixel by pixel
    assert params["crop"] == {"top": 0, "left": 0, "height": 48, "width": 64}
    gray = np.rint(frames[0] @ np.array([0.2989, 0.587, 0.114])).astype(int)
    assert np.abs(out[..., 0] - gray[:, ::-1]).max() <= 1


def test_parameters_stay_in_their_ranges_and_are_json():
    config = CONFIG.model_copy(update={"aug_blur_sigma_min": 0.5, "aug_blur_sigma_max": 1.5})
    seen = {"jitter": 0, "gray": 0, "flip": 0}
    draws = 300
    for seed in range(draws):
        p = augment.draw_params(96, 128, config, seed)
        assert json.loads(json.dumps(p)) == p
        box = p["crop"]
        area = box["height"] * box["width"] / (96 * 128)
        assert 0 <= box["top"] <= 96 - box["height"] and 0 <= box["left"] <= 128 - box["width"]
        assert 0.08 * 0.95 <= area <= 0.3 * 1.05  # rounding of h and w moves the area by a few percent
        assert 3 / 4 * 0.9 <= box["width"] / box["height"] <= 4 / 3 * 1.1
        j = p["color_jitter"]
        assert 0.6 <= j["brightness"] <= 1.4 and 0.6 <= j["contrast"] <= 1.4
        assert 0.8 <= j["saturation"] <= 1.2 and -0.1 <= j["hue"] <= 0.1
        assert sorted(j["order"]) == sorted(augment.JITTER)
        assert 0.5 <= p["blur"]["sigma"] <= 1.5 and p["blur"]["kernel_size"] % 2 == 1
        seen["jitter"] += j["applied"]
        seen["gray"] += p["grayscale"]
        seen["flip"] += p["hflip"]
    # probabilities 0.8, 0.2, 0.5 over 300 draws: each within ~5 standard deviations
    assert abs(seen["jitter"] / draws - 0.8) < 0.12 and abs(seen["gray"] / draws - 0.2) < 0.12
    assert abs(seen["flip"] / draws - 0.5) < 0.15


def test_tiny_frames_keep_a_valid_blur_kernel():
    frames = np.full((2, 6, 6, 3), 100, dtype=np.uint8)
    config = CONFIG.model_copy(update={"aug_blur_sigma_min": 2.0, "aug_blur_sigma_max": 2.0})
    view = augment.lean_view(frames, [0, 1], config, seed=0)
    assert view.params["blur"]["kernel_size"] == 5 and view.frames.shape == (2, 6, 6, 3)


def test_mismatched_indices_are_rejected(clip):
    frames, indices = clip
    with pytest.raises(ValueError, match="16 frames but 3 frame indices"):
        augment.lean_view(frames, indices[:3], CONFIG, seed=0)
