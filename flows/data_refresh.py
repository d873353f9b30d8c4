"""Data refresh: a video-QA manifest becomes ranked preference pairs (frames -> sample -> reflect -> pairs).

    leanpo run data-refresh --config run.yaml     # or deploy it: see prefect.yaml
"""

from __future__ import annotations

from prefect import flow

from leanpo_core.config import FramesConfig, PairsConfig, ReflectConfig, SampleConfig
from tasks import data


@flow(name="data-refresh", log_prints=True)
def data_refresh(manifest: str, root: str, sample: SampleConfig, frames: FramesConfig = FramesConfig(),
                 reflect: ReflectConfig = ReflectConfig(), pairs: PairsConfig = PairsConfig(),
                 split: str = "train") -> dict:
    """Build the preference pairs of one round from `manifest` under the run folder or s3:// prefix `root`."""
    videos = data.ingest(manifest, root, split)
    frames_table = data.frames(root, frames)
    samples = data.sample(root, sample)
    scored = data.reflect(root, reflect, sample.model)
    pairs_table = data.pairs(root, pairs)
    return {"videos": videos, "frames": frames_table, "samples": samples, "scored": scored, "pairs": pairs_table}
