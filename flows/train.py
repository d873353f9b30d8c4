"""Training: train -> evaluate (against the model it started from) -> publish -> gate, on one run root's pairs.

    leanpo run train --config train-run.yaml      # parameters below as YAML/JSON; or the retrain deployment
    # 2 ranks with DeepSpeed ZeRO-2: train.deepspeed: zero2, nproc_per_node: 2 (torchrun, or launcher: deepspeed)

Reads `<root>/pairs.parquet` and `<root>/frames`. With `heldout_manifest`, its `evaluate.split` questions are
ingested and decoded under `<root>/heldout` and the evaluation answers them; without it, the evaluation scores the
round's own pairs (preference accuracy) and its videos table's `evaluate.split` questions, if any. Each stage is
cached on its inputs' content, config and code: a re-run with nothing changed skips to the end.

The evaluation gate (`gate`, on by default; leanpo_core/gate.py, docs/operations.md section 9) registers the
published model in the registry and promotes it to `gate.alias` only when it beats the alias's current model (the
starting model while the alias has none) on the same questions; otherwise it is kept, marked rejected with the
reason. A promotion emits `leanpo.model.promoted`. The comparison and the decision are in the run's report.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from pydantic import Field

from leanpo_core import io, schemas
from leanpo_core.config import EvaluateConfig, FramesConfig, TrainConfig
from leanpo_core.gate import GateConfig
from leanpo_core.layout import RunLayout
from tasks import data, report
from tasks import gate as gate_tasks
from tasks import train as train_tasks


@flow(name="train", log_prints=True)
def train_flow(root: str, train: TrainConfig, evaluate: EvaluateConfig = EvaluateConfig(),
               heldout_manifest: str | None = None, frames: FramesConfig = FramesConfig(),
               baseline: str | None = None, run_id: str | None = None,
               nproc_per_node: Annotated[int, Field(ge=1, description="Training ranks on this host.")] = 1,
               launcher: train_tasks.Launcher = "auto", work_dir: str | None = None, video_root: str | None = None,
               allowed_roots: list[str] | None = None, gate: GateConfig = GateConfig()) -> dict:
    """Train `train.model` on the kept pairs under `root`, evaluate it against `baseline` (default: the model it
    started from) on held-out questions, publish the model, metrics and plot under `<root>/train/<run id>`, and
    (`gate.enabled`) register it and promote it only if it beats the current model of `gate.alias`.
    `video_root` and `allowed_roots` apply to `heldout_manifest` as in the data-refresh flow."""
    layout = RunLayout(root)
    pairs = io.read_manifest(layout.pairs).to_dict()
    frames_table = io.dataset_manifest(layout.frames, schemas.FRAMES).to_dict()
    run_id = run_id or train_tasks.run_id_for(train, pairs)
    output_dir = train_tasks.output_dir_for(root, run_id, work_dir)
    trained = train_tasks.train(train, pairs, frames_table, output_dir, run_id, nproc_per_node, launcher)
    heldout_root = io.join_uri(root, "heldout")
    if heldout_manifest:
        videos = data.ingest(heldout_manifest, heldout_root, evaluate.split, video_root, allowed_roots)
        heldout_frames = data.frames(heldout_root, frames, videos)
    else:
        videos, heldout_frames = io.read_manifest(layout.videos).to_dict(), frames_table
    baseline = baseline or train.model
    eval_pairs = None if heldout_manifest else pairs
    evaluation = train_tasks.evaluate(trained, evaluate, videos, heldout_frames, layout.evaluation(run_id), run_id,
                                      pairs=eval_pairs, baseline=baseline)
    published = train_tasks.publish(root, trained, evaluation)
    gated = None
    if gate.enabled:
        registry = gate.registry or layout.registry
        current = gate_tasks.current_model(registry, gate.alias)
        comparison = evaluation  # the candidate against its starting model: the reference while nothing is current
        if current is not None and current["model_id"] != run_id and not gate_tasks.same_model(baseline, current):
            comparison = train_tasks.evaluate(trained, evaluate, videos, heldout_frames,
                                              layout.evaluation(f"{run_id}-vs-{current['model_id']}"), run_id,
                                              pairs=eval_pairs, baseline=current["model_uri"])
        gated = gate_tasks.gate(gate, registry, published, comparison, comparison["baseline"], current, pairs,
                                train.config_hash())
    report.train_report(trained, evaluation, published, gated)
    return {**trained, "evaluation": evaluation, "published": published, "gate": gated}
