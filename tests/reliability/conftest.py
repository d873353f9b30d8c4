"""Fixtures of the reliability tests: real synthetic clips and broken variants of them, made once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from leanpo_core import synthetic
from tests.reliability.corrupt import make_variants, write_faststart


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict:
    """Six good synthetic clips (the first also under a unicode name with spaces) and ~65 broken inputs."""
    root = tmp_path_factory.mktemp("corrupt")
    manifest = synthetic.generate(root / "synthetic", num=6, seed=3, questions_per_clip=1)
    good = sorted(str(p) for p in (manifest.parent / "clips").glob("*.mp4"))
    odd_name = root / "synthetic" / "clips" / "clip ünï 日本 [1] %d.mp4"
    shutil.copyfile(good[0], odd_name)
    frames = synthetic.render_clip(synthetic.draw_params(np.random.default_rng([3, 0])))
    fast = write_faststart(frames, root / "fast.mp4")
    variants = make_variants(Path(good[0]), fast, frames, root / "variants")
    return {"good": good + [str(odd_name)], "variants": variants, "root": root, "manifest": manifest}
