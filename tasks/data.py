"""Prefect tasks of the data refresh: ingest -> frames -> sample -> reflect -> pairs (thin wrappers, URIs in and out).

Each task validates its config (pydantic already did, when the flow received it), calls one `leanpo_core` stage,
publishes the table it wrote as artifacts, and returns the table's manifest as a dict. Sampling and scoring hold a
model, so they run as `python -m leanpo_core.<stage>` children the task owns (`leanpo_core.launch`), inside the
"gpu" concurrency slot of the host. Every stage resumes shard by shard, so a retry redoes only unfinished shards.

Each task takes the manifest of the table it reads (`videos`, `frames`, ...): besides ordering the tasks, that puts
the input's content hash into the task's cache key (`tasks.common.ContentKey`), so a re-run with unchanged inputs,
config and code skips the stage, and a changed input table recomputes it.

With a shard runner (the flow's `task_runner` "dask" or "ray": tasks/scale.py), `frames_shards` and `reflect_shards`
submit one `frames-shard` / `reflect-shard` task run per shard to the cluster first; the stage task then finds every
shard done, and publishes the table as it would have written it.
"""

from __future__ import annotations

import math
import tempfile

from prefect import get_run_logger, task
from prefect.events import emit_event
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner

from leanpo_core import io, schemas
from leanpo_core.config import FramesConfig, PairsConfig, ReflectConfig, SampleConfig, StageConfig
from leanpo_core.launch import run_module
from leanpo_core.layout import RunLayout
from tasks.common import (RETRIES, ContentKey, Progress, gpu_slot, publish_table, stage_output_logger,
                          write_config)
from tasks.scale import submit_shards

PAIRS_PUBLISHED = "leanpo.pairs.published"


def _run_stage(module: str, config: StageConfig, args: list[str], timeout_s: float | None = None) -> None:
    output = stage_output_logger()
    with tempfile.TemporaryDirectory(prefix="leanpo-") as folder:
        run_module(module, ["--config", write_config(config, folder), *args], timeout_s=timeout_s, log=output.info)


@task(name="ingest", cache_policy=ContentKey(files=lambda inputs: [inputs["manifest_uri"]]), **RETRIES)
def ingest(manifest_uri: str, root: str, split: str | None = "train", video_root: str | None = None,
           allowed_roots: list[str] | None = None) -> dict:
    """Validate the video-QA manifest (CSV, JSONL, Parquet or LLaVA-Hound jsonl) into the run's videos table;
    `video_root` and `allowed_roots` as `python -m leanpo_core.videos --video-root/--allowed-root`."""
    from leanpo_core.videos import read_videos, write_videos

    rows = read_videos(manifest_uri, video_root=video_root, roots=allowed_roots)
    if split:
        rows = [r for r in rows if r.get("split") in (split, None)]
    if not rows:
        raise ValueError(f"{manifest_uri}: no rows with split {split!r}")
    manifest = write_videos(rows, RunLayout(root).videos)
    publish_table(manifest, schemas.VIDEOS)
    return manifest.to_dict()


@task(name="frames", cache_policy=ContentKey(), **RETRIES)
def frames(root: str, config: FramesConfig, videos: dict) -> dict:
    """Decode each distinct video once into sampled frames; undecodable videos become failure rows."""
    from leanpo_core.frames import run_frames

    layout = RunLayout(root)
    result = run_frames(layout.videos, layout.frames, layout.failures("frames"), config, progress=False)
    get_run_logger().info(f"frames: {result.decoded} decoded, {result.failed} failed, "
                          f"{result.skipped_shards} shard(s) already done")
    manifest = io.dataset_manifest(layout.frames, schemas.FRAMES)
    publish_table(manifest, schemas.FRAMES)
    return manifest.to_dict()


@task(name="frames-shard", cache_policy=ContentKey(), **RETRIES)
def frames_shard(root: str, config: FramesConfig, videos: dict, shard: int) -> dict:
    """Decode one frames shard (`run_frames(shards=[shard])`); runs on a Dask or Ray worker."""
    from leanpo_core.frames import run_frames

    layout = RunLayout(root)
    result = run_frames(layout.videos, layout.frames, layout.failures("frames"), config, shards=[shard],
                        progress=False)
    done = " (already done)" if result.skipped_shards else ""
    get_run_logger().info(f"frames shard {shard}: {result.decoded} decoded, {result.failed} failed{done}")
    return result.manifests[0].to_dict()


def frames_shards(runner: TaskRunner | None, root: str, config: FramesConfig, videos: dict) -> list[PrefectFuture]:
    """One `frames-shard` task run per shard of the frames plan, on `runner`, waited for (none without a runner)."""
    if runner is None:
        return []
    from leanpo_core.frames import plan_shards

    shards = sorted(plan_shards(RunLayout(root).videos, config))
    return submit_shards(runner, frames_shard, shards, root=root, config=config, videos=videos)


@task(name="sample", cache_policy=ContentKey(), **RETRIES)
def sample(root: str, config: SampleConfig, videos: dict, frames: dict, timeout_s: float | None = None) -> dict:
    """Prior-infused sampling with the generator (hint + self-reflection wins, lean augmented view loses)."""
    layout = RunLayout(root)
    shards = max(1, math.ceil(videos["rows"] / config.shard_size))
    progress = Progress("sample-progress", f"Sampling {videos['rows']} questions in {shards} shard(s) with "
                        f"`{config.model}`")
    with gpu_slot(), \
            progress.poll(lambda: len(io.shard_uris(layout.samples)) / shards):
        _run_stage("leanpo_core.sample", config, ["--root", root, "--no-progress"], timeout_s)
    manifest = io.dataset_manifest(layout.samples, schemas.SAMPLES)
    publish_table(manifest, schemas.SAMPLES)
    return manifest.to_dict()


@task(name="reflect", cache_policy=ContentKey(), **RETRIES)
def reflect(root: str, config: ReflectConfig, model: str, samples: dict, timeout_s: float | None = None) -> dict:
    """Score every candidate: self-judgement, token F1 against the answer, SFT mean log-prob; rank per side."""
    with gpu_slot():
        _run_stage("leanpo_core.reflect", config, ["--model", model, "--root", root], timeout_s)
    layout = RunLayout(root)
    manifest = io.dataset_manifest(layout.scored, schemas.SCORED)
    publish_table(manifest, schemas.SCORED)
    return manifest.to_dict()


@task(name="reflect-shard", cache_policy=ContentKey(), **RETRIES)
def reflect_shard(root: str, config: ReflectConfig, model: str, samples: dict, shard: int,
                  timeout_s: float | None = None) -> dict:
    """Score the candidates of one samples shard (`python -m leanpo_core.reflect --shards`); on a Dask or Ray
    worker, holding the host's "gpu" slot like `reflect`."""
    with gpu_slot():
        _run_stage("leanpo_core.reflect", config, ["--model", model, "--root", root, "--shards", str(shard)],
                   timeout_s)
    return io.read_manifest(io.shard_uri(RunLayout(root).scored, shard)).to_dict()


def reflect_shards(runner: TaskRunner | None, root: str, config: ReflectConfig, model: str,
                   samples: dict) -> list[PrefectFuture]:
    """One `reflect-shard` task run per samples shard, on `runner`, waited for (none without a runner)."""
    if runner is None:
        return []
    shards = sorted(io.shard_uris(RunLayout(root).samples))
    return submit_shards(runner, reflect_shard, shards, root=root, config=config, model=model, samples=samples)


@task(name="pairs", cache_policy=ContentKey(), **RETRIES)
def pairs(root: str, config: PairsConfig, scored: dict) -> dict:
    """Chosen = best winning candidate, rejected = worst losing one; drops kept with their reason."""
    from leanpo_core.pairs import run_pairs

    layout = RunLayout(root)
    manifest = run_pairs(layout.videos, layout.frames, layout.scored, layout.pairs, config)
    publish_table(manifest, schemas.PAIRS)
    return manifest.to_dict()


@task(name="announce-pairs")
def announce_pairs(root: str, pairs: dict) -> dict:
    """Emit `leanpo.pairs.published` for a new pairs table (what the retraining deployment's trigger waits for)."""
    table = io.read_table(pairs["uri"], schemas.PAIRS).select(["kept"]).column("kept").to_pylist()
    payload = {"root": root, "uri": pairs["uri"], "rows": pairs["rows"], "kept": sum(table),
               "content_hash": pairs["content_hash"], "schema_version": pairs["schema_version"]}
    emit_event(event=PAIRS_PUBLISHED, resource={"prefect.resource.id": f"leanpo.pairs.{root}",
                                                 "prefect.resource.name": pairs["uri"]}, payload=payload)
    get_run_logger().info(f"emitted {PAIRS_PUBLISHED} for {pairs['uri']} ({payload['kept']} kept pairs)")
    return payload
