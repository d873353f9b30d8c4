"""Prefect tasks of training: train (through the launcher) -> evaluate (a child, like sampling) -> publish.

Training runs as `python -m leanpo_core.train` (one process) or under torchrun / the deepspeed launcher (several
ranks), in a process group the task owns (`leanpo_core.launch`): rank output is streamed into the run's log, the
group is killed past `TrainConfig.wall_clock_limit_s` or on cancel, and a retry resumes from the last checkpoint
in the same output folder. Training writes to a LOCAL folder (the Trainer's checkpoints); `publish` copies the
model, metrics table and plot to the run root when that is elsewhere (s3://) and records where everything is.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.tasks import exponential_backoff

from leanpo_core import io, launch, schemas
from leanpo_core.config import EvaluateConfig, TrainConfig
from leanpo_core.layout import RunLayout
from tasks.common import (RETRIES, ContentKey, Progress, gpu_slot, link, publish_table, stage_output_logger,
                          transient_only, write_config)

Launcher = Literal["auto", "python", "torchrun", "deepspeed"]
# One retry, after a minute: a lost rank or a killed host resumes from its checkpoint; a crash does not recur.
TRAIN_RETRIES = {"retries": 1, "retry_delay_seconds": exponential_backoff(backoff_factor=60),
                 "retry_condition_fn": transient_only}
_TQDM = re.compile(r"(\d+)/(\d+) \[")


def run_id_for(config: TrainConfig, pairs: dict) -> str:
    """A run id from what the run learns from: the objective, then a hash of the config and the pairs' content."""
    digest = hashlib.sha256(f"{config.config_hash()}:{pairs['content_hash']}".encode()).hexdigest()
    return f"{config.objective}-{digest[:10]}"


def output_dir_for(root: str, run_id: str, work_dir: str | None = None) -> str:
    """The LOCAL training folder: the run layout's train/<run id> for a local root, else under `work_dir`
    (default: the system's temporary folder), stable per run id so that a retry resumes."""
    if work_dir is None and "://" not in root:
        return RunLayout(root).train(run_id)
    return str(Path(work_dir or Path(tempfile.gettempdir()) / "leanpo-train") / run_id)


def _command(args: list[str], nproc_per_node: int, launcher: Launcher) -> list[str]:
    if launcher == "auto":
        launcher = "python" if nproc_per_node == 1 else "torchrun"
    return launch.distributed_command("leanpo_core.train", args, nproc_per_node=nproc_per_node, launcher=launcher)


@task(name="train", cache_policy=ContentKey(), **TRAIN_RETRIES)
def train(config: TrainConfig, pairs: dict, frames: dict, output_dir: str, run_id: str, nproc_per_node: int = 1,
          launcher: Launcher = "auto") -> dict:
    """Train `config.model` on the kept pairs; rank logs stream to this run, killed past the wall-clock limit."""
    logger = get_run_logger()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    progress = Progress("train-progress", f"Training `{run_id}` ({config.objective}) on {pairs['rows']} pairs")

    output = stage_output_logger()

    def log(line: str) -> None:
        steps = _TQDM.findall(line)
        if steps and ("it/s" in line or "s/it" in line):  # a progress-bar refresh: the artifact, not the log
            done, total = map(int, steps[-1])
            progress.update(done / max(total, 1))
        elif line.strip():
            output.info(line)

    with tempfile.TemporaryDirectory(prefix="leanpo-") as folder:
        args = ["--config", write_config(config, folder), "--pairs", pairs["uri"], "--frames", frames["uri"],
                "--out", output_dir, "--run-id", run_id]
        command = _command(args, nproc_per_node, launcher)
        logger.info(f"launching: {' '.join(command)}")
        try:
            with gpu_slot():
                launch.run(command, timeout_s=config.wall_clock_limit_s, log=log)
        finally:
            progress.close()  # the terminal bar of a failed run goes; the artifact keeps its last value
    progress.update(1.0, force=True)
    metrics = io.read_manifest(io.join_uri(output_dir, "metrics.parquet"))
    publish_table(metrics, schemas.TRAIN_METRICS)
    rows = io.read_table(metrics.uri, schemas.TRAIN_METRICS).to_pylist()
    last = rows[-1] if rows else {}
    return {"run_id": run_id, "objective": config.objective, "base_model": config.model, "output_dir": output_dir,
            "model": str(Path(output_dir) / "model"), "metrics": metrics.to_dict(),
            "plot": str(Path(output_dir) / "metrics.png"), "steps": last.get("step", 0),
            "final_loss": last.get("loss"), "uri": output_dir, "content_hash": metrics.content_hash}


@task(name="sft-pairs", cache_policy=ContentKey(), **RETRIES)
def sft_pairs(out: str, videos: dict, frames: dict) -> dict:
    """Ground-truth answers as chosen responses: warm-start data for `objective: sft` (rejected = chosen, unused)."""
    from leanpo_core.frames import FrameStore
    from leanpo_core.pairs import pair_row

    store = FrameStore(frames["uri"])
    rows = []
    for video in io.read_table(videos["uri"], schemas.VIDEOS).to_pylist():
        key = store.key_for(video["video"])
        if key is None:
            continue  # undecodable: already a row of the frames stage's failures table
        frame = store.rows[key]
        rows.append(pair_row(f"{video['id']}:sft", video["id"], video["question"], video["video"], frame,
                             video["answer"], video["answer"], config_hash="sft-warm-start"))
    if not rows:
        raise ValueError(f"{videos['uri']}: no question has decoded frames in {frames['uri']}")
    manifest = io.write_table(rows, out, schemas.PAIRS)
    publish_table(manifest, schemas.PAIRS, key="sft-pairs")
    return manifest.to_dict()


@task(name="evaluate", cache_policy=ContentKey(), **RETRIES)
def evaluate(trained: dict, config: EvaluateConfig, videos: dict, frames: dict, out: str, run_id: str,
             pairs: dict | None = None, baseline: str | None = None, timeout_s: float | None = None) -> dict:
    """Evaluate the trained model (and the baseline it started from) on held-out questions and pairs."""
    from leanpo_core.evaluate import answers_uri, benchmark_answers_uri, report_uri

    with tempfile.TemporaryDirectory(prefix="leanpo-") as folder:
        args = ["--config", write_config(config, folder), "--model", trained["model"], "--videos", videos["uri"],
                "--frames", frames["uri"], "--out", out, "--run-id", run_id]
        args += ["--pairs", pairs["uri"]] if pairs else []
        args += ["--baseline", baseline] if baseline else []
        with gpu_slot():
            launch.run_module("leanpo_core.evaluate", args, timeout_s=timeout_s, log=stage_output_logger().info)
    manifest = io.read_manifest(out)
    publish_table(manifest, schemas.EVALUATION)
    publish_table(io.read_manifest(answers_uri(out)), schemas.ANSWERS)
    if config.benchmark:  # every benchmark reply with the letter read from it
        publish_table(io.read_manifest(benchmark_answers_uri(out)), schemas.BENCHMARK_ANSWERS)
    rows = io.read_table(out, schemas.EVALUATION).to_pylist()
    return {**manifest.to_dict(), "report": report_uri(out), "model": trained["model"], "baseline": baseline,
            "answers": answers_uri(out),
            "metrics": [{k: r[k] for k in ("model", "split", "metric", "value", "n", "ci_low", "ci_high")}
                        for r in rows]}


@task(name="publish", **RETRIES)
def publish(root: str, trained: dict, evaluation: dict | None = None) -> dict:
    """Put the exported model, metrics table and plot at the run root (copied when trained elsewhere) and record
    where they are in `<root>/train/<run id>/published.json`, written last."""
    dest = RunLayout(root).train(trained["run_id"])
    model_uri, metrics_uri = io.join_uri(dest, "model"), io.join_uri(dest, "metrics.parquet")
    plot_uri = io.join_uri(dest, "metrics.png")
    if Path(dest).resolve() != Path(trained["output_dir"]).resolve() or "://" in dest:
        io.copy_folder(trained["model"], model_uri)
        for name in ("metrics.parquet", io.manifest_uri("metrics.parquet"), "metrics.png"):
            io.write_bytes(io.join_uri(dest, name), (Path(trained["output_dir"]) / name).read_bytes())
    record = {"run_id": trained["run_id"], "objective": trained["objective"], "base_model": trained["base_model"],
              "model": model_uri, "local_model": trained["model"], "metrics": metrics_uri, "plot": plot_uri,
              "steps": trained["steps"], "final_loss": trained["final_loss"],
              "evaluation": evaluation["uri"] if evaluation else None,
              "evaluation_report": evaluation["report"] if evaluation else None,
              "published_at": datetime.now(timezone.utc).isoformat()}
    record_uri = io.join_uri(dest, "published.json")
    io.write_bytes(record_uri, json.dumps(record, indent=2).encode())
    create_link_artifact(key="model", link=link(model_uri), link_text=model_uri,
                         description=f"Model trained by `{trained['run_id']}` ({trained['objective']}, "
                                     f"{trained['steps']} steps) from `{trained['base_model']}`; record: "
                                     f"`{record_uri}`")
    return {**record, "record": record_uri}
