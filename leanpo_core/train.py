"""Train: LeanPO (and its baselines SimPO, DPO, SFT) on self-generated video preference pairs.

Reads the kept rows of the pairs table and the frames the sampling stage used (never re-sampled), and trains with a
`transformers.Trainer` subclass (not TRL). A pair's video goes through the vision tower ONCE and its features serve
both the chosen and the rejected response; with `prefix_sharing` (default) the pair is one sequence
`[prompt | chosen | rejected]`, so the language model reads the prompt and its video tokens once too (leanpo_core/
prefix.py); logits exist only at response positions (docs/method.md section 7).
Objectives: `leanpo` (default, docs/method.md section 2), `simpo`, `dpo` (frozen reference copy) and `sft` (the CE term
on chosen responses alone). Writes `<out>/metrics.parquet` (table train_metrics), `<out>/metrics.png`, TensorBoard
events under `<out>/runs`, checkpoints `<out>/checkpoint-N` and the exported model `<out>/model` (safetensors).

    python -m leanpo_core.train --config train.yaml --root /data/run1 --run-id r1     # -> /data/run1/train/r1
    python -m leanpo_core.train --config train.yaml --pairs s3://b/run1/pairs.parquet --frames s3://b/run1/frames \\
        --out /scratch/r1
    torchrun --nproc_per_node 2 -m leanpo_core.train --config train.yaml --root /data/run1 --run-id r1
    deepspeed --num_gpus 2 --module leanpo_core.train --config train.yaml --root /data/run1 --run-id r1

The likelihood-displacement monitor (`displacement/*`) compares rbar now with rbar under the SAME input before
training: the reflect stage's SFT score (`*_sft_logp`), measured on the plain question and clean frames. The
generation-time log-probs are only a fallback (chosen: measured under the hint/reflection prompt; rejected: under the
2-frame lean view), so with them the monitor also carries the change of input, not only of the model.

With `deepspeed: zero2|zero3` the config of deployments/ds_zero{2,3}.json is used (its "auto" values are filled
from the TrainConfig). The config file holds TrainConfig fields (YAML or JSON). `leanpo_core.launch.run_module(
"leanpo_core.train", args, launcher="torchrun"|"deepspeed", nproc_per_node=N)` builds the launch commands above. On
CPU the ranks talk over gloo (DeepSpeed's JIT-built shared-memory all-reduce is skipped, see
`_skip_deepspeed_shm_build`).

Metrics rows are written by world process zero; each column is the mean over ranks of that rank's micro-batch
means (the loss and grad norm as the Trainer reduces them). A checkpoint counts once every rank has saved its part
and the metrics up to it are written (its CHECKPOINT_COMPLETE marker): a run killed at any point (a SIGKILLed rank)
and launched again with the same command resumes from the newest complete checkpoint, and its metrics table then
holds each step once. A refused config or input exits with `launch.EXIT_BAD_INPUT` (`launch.stage_entry`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from leanpo_core import features as features_mod
from leanpo_core import io, logps, loss, models, prefix, schemas, stagecli
from leanpo_core.config import TrainConfig
from leanpo_core.layout import RunLayout, table_arguments
from leanpo_core.pairdata import SIDE_INFO, PairCollator, PairsDataset

DEPLOYMENTS = Path(__file__).resolve().parents[1] / "deployments"
METRIC_COLUMNS = [c for c in schemas.TRAIN_METRICS.columns if c not in ("run_id", "step", "epoch")]
# Written into checkpoint-N by world process zero after every rank has saved its part and the metrics up to N.
CHECKPOINT_COMPLETE = "leanpo-complete"


@dataclasses.dataclass
class TrainResult:
    """Where a run left its outputs, and how far it went."""

    output_dir: str
    model_dir: str
    metrics_uri: str
    plot_path: str
    steps: int
    final_loss: float
    model: Any = dataclasses.field(default=None, repr=False)  # the trained model in memory (unwrapped)


# ---------------------------------------------------------------- forward and loss


def pair_logps(model, adapter: models.FamilyAdapter, batch: dict, chunk_size: int = 0,
               cache: features_mod.FeatureCache | None = None, pack_tokens: int = 0):
    """Lean path: (sums, counts) of response log-probs, each (2B,), chosen rows first; vision once per pair,
    logits only at response positions; the prompt once per pair too when the batch holds joined rows
    (`pairdata.PairCollator(prefix_sharing=True)`, `prefix.pair_logps`). With a `cache` (frozen tower) and the batch's
    video ids, a video's features are computed once per process (`features.cached_video_features`).
    `pack_tokens`: joined rows packed into rows of up to that many tokens (`prefix.Packing`)."""
    features = None
    if cache is not None and features_mod.VIDEO_IDS in batch:
        features = features_mod.cached_video_features(adapter, model, batch, batch[features_mod.VIDEO_IDS], cache)
    if prefix.LENGTHS in batch:
        return prefix.pair_logps(model, adapter, batch, chunk_size, features=features, pack_tokens=pack_tokens)
    hidden = adapter.shared_video_hidden_states(model, batch, copies=2, features=features)
    return logps.response_logps(hidden, batch["labels"], models.output_projection(model), chunk_size)


class PairPolicy(torch.nn.Module):
    """The policy as the Trainer sees it: `forward(**pair_batch)` is the lean path, returning (sums, counts).

    Wrapping the HF model (not calling its backbone from `compute_loss`) keeps the lean forward inside the
    distributed wrapper's own forward: DDP all-reduces only gradients of a backward that followed its forward, and
    DeepSpeed hooks its forward too.
    """

    def __init__(self, model, adapter: models.FamilyAdapter, chunk_size: int = 0,
                 cache: features_mod.FeatureCache | None = None, pack_tokens: int = 0):
        super().__init__()
        self.model, self.adapter, self.chunk_size, self.cache = model, adapter, chunk_size, cache
        self.pack_tokens = pack_tokens
        self.config = models.unwrap(model).config

    def forward(self, **batch):
        return pair_logps(self.model, self.adapter, batch, self.chunk_size, self.cache, self.pack_tokens)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.model.gradient_checkpointing_enable(**kwargs)


def _finite_or_none(values: torch.Tensor) -> torch.Tensor | None:
    return values if bool(torch.isfinite(values).all()) else None


def objective_loss(config: TrainConfig, sums: torch.Tensor, counts: torch.Tensor, batch: dict,
                   ref_sums: torch.Tensor | None = None) -> loss.LossOutput:
    """The configured objective over a pair batch's (2B,) log-prob sums and counts (chosen rows first), with the
    likelihood-displacement monitor: rbar now minus the pair's baseline (`pairdata.displacement_baseline`), per side whose
    baseline every pair of the batch has (and whose responses were scored: sft leaves the rejected side out)."""
    half = sums.shape[0] // 2
    cs, rs, cn, rn = sums[:half], sums[half:], counts[:half], counts[half:]
    beta = config.effective_beta
    if config.objective == "leanpo":
        out = loss.leanpo_loss(cs, cn, rs, rn, beta=beta, gamma=config.gamma, eps=config.label_smoothing,
                               d=config.smoothing_threshold, smoothing=config.smoothing_form,
                               sft_weight=config.sft_weight)
    elif config.objective == "dpo":
        out = loss.dpo_loss(cs, cn, rs, rn, ref_sums[:half], ref_sums[half:], beta=beta)
    elif config.objective == "simpo":
        out = loss.simpo_loss(cs, cn, rs, rn, beta=beta, gamma=config.gamma)
    else:
        out = loss.sft_loss(cs, cn, rs, rn)
    base_c = _finite_or_none(batch["chosen_baseline"].to(sums.device))
    base_r = _finite_or_none(batch["rejected_baseline"].to(sums.device)) if bool((rn > 0).all()) else None
    out.metrics.update(loss.displacement_metrics(cs / cn, rs / rn.clamp(min=1), base_c, base_r))
    return out


# ---------------------------------------------------------------- model setup


def _freeze_vision(model) -> None:
    """Train the language model and LM head only: vision tower, projector (and LLaVA's image_newline) frozen."""
    for _, p in models.vision_parameters(model):
        p.requires_grad_(False)


def _prefix_sharing_possible(model) -> bool:
    reason = prefix.unsupported_reason(model)
    if reason is not None:
        print(f"train: prefix sharing off: {reason}; each pair runs as two sequences", file=sys.stderr, flush=True)
    return reason is None


def _add_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    return get_peft_model(model, lora)


def _skip_deepspeed_shm_build() -> None:
    """Let DeepSpeed's CPU ranks all-reduce over plain gloo, without its shared-memory op.

    On a CPU accelerator `deepspeed.init_distributed` JIT-compiles that op with the machine's C++ compiler (30 s
    on 2 idle cores, minutes on busy ones, and a crash where no compiler is installed); it only speeds up
    all-reduces of large tensors. `LEANPO_DS_SHM_COMM=1` keeps it. GPU accelerators never build it.
    """
    if torch.cuda.is_available() or os.environ.get("LEANPO_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _use_bf16(config: TrainConfig) -> bool:
    return config.precision == "bf16" or (config.precision == "auto" and torch.cuda.is_available())


def _training_arguments(config: TrainConfig, output_dir: str, logging_steps: int = 1):
    from transformers import TrainingArguments

    ds = None if config.deepspeed == "none" else str(DEPLOYMENTS / f"ds_{config.deepspeed}.json")
    return TrainingArguments(
        output_dir=output_dir, seed=config.seed, data_seed=config.seed,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler, warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay, num_train_epochs=config.epochs, max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        bf16=_use_bf16(config), save_strategy="steps", save_steps=config.save_steps, logging_steps=logging_steps,
        report_to=["tensorboard"], remove_unused_columns=False,  # TensorBoard events: <output_dir>/runs/...
        dataloader_num_workers=0, deepspeed=ds, use_cpu=not torch.cuda.is_available(),
    )


class PreferenceTrainer(Trainer):
    """Trainer whose loss is a preference objective over the lean pair forward; logs its metrics (the mean over
    ranks) and writes them with every checkpoint, which it marks complete once every rank has saved."""

    def __init__(self, *args, leanpo_config: TrainConfig, adapter: models.FamilyAdapter, run_id: str,
                 ref_model=None, storage: io.StorageOptions | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.leanpo_config, self.adapter, self.run_id, self.ref_model = leanpo_config, adapter, run_id, ref_model
        self.storage = storage
        self.model_accepts_loss_kwargs = False  # our loss is a per-micro-batch mean: Trainer divides by GA
        self._pending: list[dict[str, float]] = []
        self.metric_rows: list[dict] = []

    def _get_train_sampler(self, train_dataset=None):
        generator = torch.Generator().manual_seed(self.args.data_seed)
        return LengthGroupedSampler(self.args.train_batch_size, lengths=self.train_dataset.lengths,
                                    generator=generator)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sums, counts = model(**{k: v for k, v in inputs.items() if k not in SIDE_INFO})
        ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref, _ = pair_logps(self.ref_model, self.adapter, inputs, self.leanpo_config.logits_chunk_size,
                                    pack_tokens=self.leanpo_config.pack_tokens)
        out = objective_loss(self.leanpo_config, sums, counts, inputs, ref)
        if model.training:
            self._pending.append(out.metrics)
        return (out.loss, out) if return_outputs else out.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Every rank logs at the same steps (the Trainer gathers the loss there), so the mean over ranks is
        # taken here, collectively; only world process zero keeps the row.
        if self._pending and "loss" in logs:
            averaged = {k: float(np.mean([m[k] for m in self._pending if k in m]))
                        for k in dict.fromkeys(k for m in self._pending for k in m)}
            self._pending.clear()
            logs.update({k: v for k, v in _mean_over_ranks(averaged, self.args).items() if k != "loss"})
            row = {"run_id": self.run_id, "step": self.state.global_step, "epoch": float(self.state.epoch or 0)}
            row.update({c: (float(logs[c]) if logs.get(c) is not None else None) for c in METRIC_COLUMNS})
            self.metric_rows.append(row)
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank's weights, optimizer shard and RNG state are on disk
        if self.is_world_process_zero():
            write_metrics(self.metric_rows, self.args.output_dir, self.storage)  # rows up to this step
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            (folder / CHECKPOINT_COMPLETE).write_text(f"{self.state.global_step}\n")


def _mean_over_ranks(metrics: dict[str, float], args) -> dict[str, float]:
    """Each metric column's mean over the ranks that have it (a rank's value is the mean of its micro-batches);
    a collective call on every rank. The Trainer's own loss, learning rate and grad norm are global already."""
    import torch.distributed as dist

    if args.world_size <= 1 or not dist.is_initialized():
        return metrics
    keys = [c for c in METRIC_COLUMNS if c not in ("loss", "learning_rate", "grad_norm")]
    values = torch.tensor([metrics.get(k, math.nan) for k in keys], dtype=torch.float64)
    have = torch.isfinite(values)
    totals = torch.stack([torch.where(have, values, 0.0), have.double()]).to(args.device)
    dist.all_reduce(totals)
    totals = totals.cpu()
    return {**metrics, **{k: float(totals[0, i] / totals[1, i]) for i, k in enumerate(keys) if totals[1, i] > 0}}


# ---------------------------------------------------------------- outputs


def write_metrics(rows: list[dict], output_dir: str, options: io.StorageOptions | None = None) -> tuple[str, str]:
    """Write the train_metrics table and its plot; return (table URI, PNG path)."""
    uri = io.join_uri(output_dir, "metrics.parquet")
    io.write_table(rows, uri, schemas.TRAIN_METRICS, options)
    png = str(Path(output_dir) / "metrics.png")
    plot_metrics(rows, png)
    return uri, png


def _checkpoints(output_dir: str) -> list[tuple[int, Path]]:
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint every rank finished saving (its CHECKPOINT_COMPLETE marker exists), or None.

    A run killed while saving leaves a newer folder without the marker (a rank's optimizer shard or RNG state may
    be missing, the metrics table may not reach it); the Trainer's own `get_last_checkpoint` would pick it."""
    complete = [p for _, p in _checkpoints(output_dir) if (p / CHECKPOINT_COMPLETE).is_file()]
    return str(complete[-1]) if complete else None


def _remove_incomplete_checkpoints(output_dir: str, last: str | None) -> None:
    """Delete checkpoint folders newer than `last` (half-written by a killed run), so the resumed run saves those
    steps into empty folders. Runs before any rank can save again (the ranks meet in collectives first)."""
    newest = int(Path(last).name.split("-")[1]) if last else 0
    for step, path in _checkpoints(output_dir):
        if step > newest:
            shutil.rmtree(path)


def resumed_metrics(output_dir: str, step: int, options: io.StorageOptions | None = None) -> list[dict]:
    """The metrics rows an interrupted run logged up to `step` (its checkpoint wrote them), or none."""
    uri = io.join_uri(output_dir, "metrics.parquet")
    if not io.exists(uri, options):
        return []
    return [r for r in io.read_table(uri, schemas.TRAIN_METRICS, options).to_pylist() if r["step"] <= step]


def plot_metrics(rows: list[dict], path: str) -> None:
    """Two panels over steps: chosen and rejected mean log-probs (the paper's Figure 1 view); the reward margin and
    the smoothing gate's active share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(name):
        return [r["step"] for r in rows], [np.nan if r.get(name) is None else r[name] for r in rows]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name, label in (("logps/chosen", "chosen"), ("logps/rejected", "rejected")):
        top.plot(*series(name), marker=".", label=label)
    top.set_ylabel("mean token log-prob")
    top.legend()
    bottom.plot(*series("rewards/margins"), marker=".", color="tab:green", label="reward margin")
    bottom.set_ylabel("reward margin")
    share = bottom.twinx()
    share.plot(*series("label_smoothing/active_fraction"), marker=".", color="tab:red", label="smoothing active")
    share.set_ylabel("smoothing gate active share")
    share.set_ylim(-0.05, 1.05)
    bottom.set_xlabel("step")
    fig.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def export_model(trainer, processor, model_dir: str):
    """A plain Hugging Face folder (safetensors + processor) that `from_pretrained` loads; LoRA merged in.

    Returns the trained model in memory (unwrapped; under ZeRO-3 its local parameters are partitioned)."""
    model = trainer.accelerator.unwrap_model(trainer.model).model
    state = None
    if trainer.is_deepspeed_enabled and trainer.args.hf_deepspeed_config.is_zero3():
        # Every rank takes part in gathering the partitioned weights (LoRA is refused with ZeRO-3 by TrainConfig).
        full = trainer.accelerator.get_state_dict(trainer.deepspeed)  # None except on the saving rank
        state = None if full is None else {k.removeprefix("model."): v for k, v in full.items()}
    if trainer.args.should_save:
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model.save_pretrained(model_dir, state_dict=state)
        processor.save_pretrained(model_dir)
    return model


# ---------------------------------------------------------------- entry points


def train(config: TrainConfig, pairs_uri: str, frames_uri: str, output_dir: str,
          options: io.StorageOptions | None = None, run_id: str | None = None) -> TrainResult:
    """Train `config.model` on the kept pairs with `config.objective`; outputs under the local `output_dir`.

    A run whose `output_dir` holds checkpoints resumes from the last one (weights, optimizer, scheduler, RNG and
    data position, as the Trainer stores them) and keeps the metrics rows logged up to it.
    """
    from transformers import set_seed

    set_seed(config.seed)
    if config.deepspeed != "none":
        _skip_deepspeed_shm_build()
    model, processor, adapter = models.load_model(config.model, dtype=torch.float32, device=None)
    model.config.use_cache = False
    ref_model = None
    if config.objective == "dpo":
        ref_model, _, _ = models.load_model(config.model, dtype=torch.float32, device=None)
        ref_model.eval().requires_grad_(False)
    if config.freeze_vision:
        _freeze_vision(model)
    if config.lora:
        model = _add_lora(model, config.lora_rank)
    dataset = PairsDataset(pairs_uri, frames_uri, processor, adapter, config.max_length, options)
    tokenizer = getattr(processor, "tokenizer", processor)
    sharing = config.prefix_sharing and _prefix_sharing_possible(model)
    cache = None  # a tower that trains changes its features; under ZeRO-3 running it is collective (features.py)
    if config.freeze_vision and config.vision_feature_cache_mib > 0 and config.deepspeed != "zero3":
        cache = features_mod.new_cache(config.vision_feature_cache_mib, config.persist_vision_features, frames_uri,
                                       options)
    args = _training_arguments(config, output_dir)
    run_id = run_id or Path(output_dir).name
    policy = PairPolicy(model, adapter, config.logits_chunk_size, cache, config.pack_tokens)
    collator = PairCollator(tokenizer.pad_token_id or 0, sharing, chosen_only=sharing and config.objective == "sft")
    trainer = PreferenceTrainer(model=policy, args=args, train_dataset=dataset, data_collator=collator, leanpo_config=config,
                          adapter=adapter, run_id=run_id, ref_model=ref_model, storage=options)
    if ref_model is not None:
        ref_model.to(trainer.args.device)
    last = last_complete_checkpoint(output_dir)
    if trainer.is_world_process_zero():
        _remove_incomplete_checkpoints(output_dir, last)
    if last is not None:
        trainer.metric_rows = resumed_metrics(output_dir, int(Path(last).name.split("-")[-1]), options)
    output = trainer.train(resume_from_checkpoint=last)
    if cache is not None and trainer.is_world_process_zero():
        print(f"train: {cache.summary()}", file=sys.stderr, flush=True)
    model_dir = str(Path(output_dir) / "model")
    trained = export_model(trainer, processor, model_dir)
    metrics_uri, png = io.join_uri(output_dir, "metrics.parquet"), str(Path(output_dir) / "metrics.png")
    if trainer.is_world_process_zero():
        metrics_uri, png = write_metrics(trainer.metric_rows, output_dir, options)
    return TrainResult(output_dir=output_dir, model_dir=model_dir, metrics_uri=metrics_uri, plot_path=png,
                       steps=trainer.state.global_step, final_loss=float(output.training_loss),
                       model=trained)


def main(argv: list[str] | None = None) -> TrainResult:
    """CLI: train on a pairs table and its frames (tables from --root, each overridable; leanpo_core/stagecli.py)."""
    parser = stagecli.stage_parser("train", __doc__, ("pairs", "frames"), TrainConfig)
    parser.add_argument("--out", help="LOCAL output folder (checkpoints, metrics, model); default: the run "
                        "layout's train/<run id> under a local --root")
    parser.add_argument("--run-id", help="run id in the metrics table (default: the config's hash)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed
    args = parser.parse_args(argv)
    uris = table_arguments(parser, args, "train", ("pairs", "frames"))
    config = stagecli.stage_config(args, TrainConfig, "train")
    run_id = args.run_id or config.config_hash()
    out = args.out or (RunLayout(args.root).train(run_id) if args.root and "://" not in args.root else None)
    if not out:
        parser.error("give --out (a local folder) unless --root is a local folder")
    result = train(config, uris["pairs"], uris["frames"], out, run_id=run_id)
    stagecli.report(args, [f"trained {result.steps} step(s), final loss {result.final_loss:.4f}",
                           f"model: {result.model_dir}"],
                    {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name != "model"})
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 has written the model and metrics; then every rank leaves the group
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    from leanpo_core.launch import stage_entry

    # Everything is written and the process group left when main returns: end without interpreter teardown, where
    # pyarrow's thread pools can abort a rank that has finished (stage_entry).
    stage_entry(main, hard_exit=True)
