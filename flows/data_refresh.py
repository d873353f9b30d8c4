"""Data refresh: a video-QA manifest becomes ranked preference pairs (frames -> sample -> reflect -> pairs).

    leanpo run data-refresh --config refresh.yaml     # parameters below as YAML/JSON; or deploy it: prefect.yaml

A new pairs table (not a cached one) is announced with the event `leanpo.pairs.published` (resource
`leanpo.pairs.<root>`, payload: root, uri, rows, kept, content_hash, schema_version), which the retraining
deployment's trigger waits for. The pipeline flow trains on its own pairs, so it refreshes with `announce=False`
(an event would start a second, triggered training on the same round).

`task_runner: dask` runs each frames shard and each scoring shard as its own task on a Dask cluster: a local one
of `local_workers` processes, or the scheduler at `cluster_address` (tasks/scale.py, docs/operations.md section 6).
"""

from __future__ import annotations

from prefect import flow

from leanpo_core.config import FramesConfig, PairsConfig, ReflectConfig, SampleConfig
from tasks import data, report, scale


@flow(name="data-refresh", log_prints=True)
def data_refresh(manifest: str, root: str, sample: SampleConfig, frames: FramesConfig = FramesConfig(),
                 reflect: ReflectConfig = ReflectConfig(), pairs: PairsConfig = PairsConfig(),
                 split: str = "train", announce: bool = True, video_root: str | None = None,
                 allowed_roots: list[str] | None = None, task_runner: scale.TaskRunnerName = "thread",
                 cluster_address: str | None = None, local_workers: int = 2) -> dict:
    """Build the preference pairs of one round from `manifest` under the run folder or s3:// prefix `root`; `announce`:
    emit `leanpo.pairs.published` when the pairs table is new. `video_root` (where relative video paths resolve;
    default the manifest's folder) and `allowed_roots` (further folders or s3:// prefixes that absolute video paths
    may point into) are `python -m leanpo_core.videos --video-root/--allowed-root`. `task_runner`: where frames and
    scoring shards run: "thread" (in this process, one task per stage), "dask" (one task per shard on a Dask
    cluster: the scheduler at `cluster_address`, e.g. tcp://scheduler:8786, or a local cluster of `local_workers`
    processes) or "ray" (the same on Ray, with prefect-ray installed)."""
    runner = scale.shard_runner(task_runner, cluster_address, local_workers)
    with scale.running(runner):
        videos = data.ingest(manifest, root, split, video_root, allowed_roots)
        frames_table = data.frames(root, frames, videos, wait_for=data.frames_shards(runner, root, frames, videos))
        samples = data.sample(root, sample, videos, frames_table)
        scored = data.reflect(root, reflect, sample.model, samples,
                              wait_for=data.reflect_shards(runner, root, reflect, sample.model, samples))
    pairs_state = data.pairs(root, pairs, scored, return_state=True)
    pairs_table = pairs_state.result()
    announced = announce and pairs_state.name != "Cached"  # a cache hit is no new table
    if announced:
        data.announce_pairs(root, pairs_table)
    outputs = {"videos": videos, "frames": frames_table, "samples": samples, "scored": scored, "pairs": pairs_table}
    report.refresh_report(root, outputs, announced)
    return {**outputs, "announced": announced}
