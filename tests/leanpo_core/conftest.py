"""Shared fixtures: a tiny model of every family and frames decoded from a real mp4, built once per session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leanpo_core import models, toy

FAMILIES = toy.FAMILIES


@pytest.fixture(scope="session")
def video(tmp_path_factory):
    """16 frames (16, 96, 128, 3) uint8 sampled uniformly by decord from a 48-frame 12 fps mp4, and their metadata."""
    import decord

    clip = toy.write_test_clip(tmp_path_factory.mktemp("clip") / "clip.mp4")
    reader = decord.VideoReader(str(clip))
    indices = np.linspace(0, len(reader) - 1, 16).round().astype(int).tolist()
    frames = reader.get_batch(indices).asnumpy()
    meta = models.video_metadata(frames, fps=reader.get_avg_fps(), frames_indices=indices,
                                 total_num_frames=len(reader))
    return frames, meta


@pytest.fixture(scope="session")
def toy_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toys")
    return {family: toy.build_toy_model(family, root / family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="session")
def loaded(toy_dirs):
    """family -> (model, processor, adapter), each reloaded once from its folder with `from_pretrained`."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = models.load_model(toy_dirs[family], dtype=torch.float32)
            cache[family][0].eval()
        return cache[family]

    return get
