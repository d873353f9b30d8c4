"""The whole pipeline: data refresh -> train (-> evaluate -> publish), for one or more self-improvement rounds.

    leanpo run pipeline --config pipeline.yaml    # parameters below as YAML/JSON; or the pipeline deployment

Round r works under `<root>/round-r`. Round 0 samples with `sample.model` and trains `train.model` (normally the
same SFT model). Each round's train flow runs the evaluation gate (`gate`) against ONE registry, `<root>/registry`
unless `gate.registry` says otherwise: a round's model is promoted only if it beats the alias's current model, and
every later round samples with, scores with and trains the alias's current (promoted) model, so a rejected candidate
is never built on (while nothing is promoted, the model the previous round started from). With `gate.enabled:
false` each round starts from the newest model (docs/method.md section 5.6's iterative self-improvement). Held-out
questions for evaluation come from the same manifest (`evaluate.split`).
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from pydantic import Field

from leanpo_core import io
from leanpo_core.config import EvaluateConfig, FramesConfig, PairsConfig, ReflectConfig, SampleConfig, TrainConfig
from leanpo_core.gate import GateConfig
from leanpo_core.layout import RunLayout
from flows.data_refresh import data_refresh
from flows.train import train_flow
from tasks import gate as gate_tasks
from tasks import report, scale


@flow(name="pipeline", log_prints=True)
def pipeline(manifest: str, root: str, sample: SampleConfig, train: TrainConfig,
             frames: FramesConfig = FramesConfig(), reflect: ReflectConfig = ReflectConfig(),
             pairs: PairsConfig = PairsConfig(), evaluate: EvaluateConfig = EvaluateConfig(),
             rounds: Annotated[int, Field(ge=1, le=100, description="Self-improvement rounds.")] = 1,
             split: str = "train", work_dir: str | None = None, video_root: str | None = None,
             allowed_roots: list[str] | None = None, gate: GateConfig = GateConfig(),
             task_runner: scale.TaskRunnerName = "thread", cluster_address: str | None = None,
             local_workers: int = 2) -> dict:
    """`rounds` rounds of sampling, scoring, pairing, training and evaluation; with the gate (the default) each
    later round starts from the alias's current (promoted) model, so a rejected candidate is never built on;
    without it, from the newest model. `video_root` and `allowed_roots` locate the manifest's videos as in the data
    refresh; `task_runner`, `cluster_address` and `local_workers` run its shards as there (a Dask cluster)."""
    generator, policy, done = sample.model, train.model, []
    gate = gate.model_copy(update={"registry": gate.registry or RunLayout(root).registry})
    for index in range(rounds):
        round_root = io.join_uri(root, f"round-{index}")
        refresh = data_refresh(manifest, round_root, sample.model_copy(update={"model": generator, "round": index}),
                               frames, reflect, pairs, split, announce=False, video_root=video_root,
                               allowed_roots=allowed_roots, task_runner=task_runner,
                               cluster_address=cluster_address, local_workers=local_workers)
        trained = train_flow(round_root, train.model_copy(update={"model": policy}), evaluate,
                             heldout_manifest=manifest, frames=frames, work_dir=work_dir, video_root=video_root,
                             allowed_roots=allowed_roots, gate=gate)
        done.append({"generator": generator, "refresh": refresh, "train": trained})
        generator = policy = next_model(trained, gate, generator)
    report.pipeline_report(root, done)
    # model: the newest trained model; next_model: where a further round would start (the promoted model)
    return {"rounds": done, "model": done[-1]["train"]["model"], "next_model": generator}


def next_model(trained: dict, gate: GateConfig, previous: str) -> str:
    """The model the next round samples with and trains: the gate's current model for the alias (its registry
    copy) when the gate ran, else `previous` while nothing is current; without the gate, the newest model."""
    if not gate.enabled:
        return trained["model"]
    current = gate_tasks.current_model(gate.registry, gate.alias)
    return current["model_uri"] if current else previous
