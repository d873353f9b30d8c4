"""Stage configs: one pydantic model per pipeline stage, flat fields with descriptions.

Flat fields with descriptions become the Prefect UI's run form; validation happens on construction, so a bad
config fails before any work starts, with a message naming the field. `config_hash` is what provenance columns
and caches key on. Defaults are those of docs/method.md (section 4 and 5).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from leanpo_core.launch import BadInput
from leanpo_core.scoring import ScoringPrecision


MAX_TIMEOUT_S = 86400.0  # one day; the OS's wait calls overflow on timeouts near 1e9 s
MAX_SEED = 2**32 - 1  # numpy's legacy seeding (transformers' set_seed) and vLLM take 32-bit seeds


class StageConfig(BaseModel):
    """Base of every stage config: unknown fields are errors, values are re-validated on assignment, and no float
    is inf or NaN unless its field says so (an infinite weight or epoch count would only fail deep inside a run)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    def config_hash(self) -> str:
        """A short content hash of the config's values (provenance and cache key)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(f"{type(self).__name__}:{canonical}".encode()).hexdigest()[:16]


class FramesConfig(StageConfig):
    """Frame extraction: which frames of each video the model sees, decoded once."""

    sampling: Literal["uniform", "fps"] = Field("uniform", description="uniform: `num_frames` evenly spaced "
                                                "frames; fps: one frame every 1/`fps` seconds, at most `max_frames`.")
    num_frames: int = Field(16, ge=1, le=8192, description="Frames per video with uniform sampling (at least the "
                            "video's frame count keeps every frame).")
    fps: float = Field(1.0, gt=0, le=120, description="Sampling rate for fps sampling (frames per second).")
    max_frames: int = Field(32, ge=1, le=1024, description="Cap on frames per video with fps sampling.")
    min_frames: int = Field(2, ge=1, le=1024, description="Floor on frames with fps sampling (short clips).")
    max_side: int = Field(448, ge=16, le=4096, description="Resize so the longer side is at most this many pixels "
                          "(aspect kept). Processors resize again to their own grid.")
    decoder: Literal["auto", "decord", "pyav"] = Field("auto", description="auto: PyAV (indexed: seeks, skips "
                                                       "unreferenced frames), decord when PyAV fails; decord or "
                                                       "pyav: that one alone.")
    max_source_pixels: int = Field(7680 * 4320, ge=16 * 16, description="Largest source frame (width x height) "
                                   "that is decoded, 8K UHD by default; a video declaring a larger one is a failure "
                                   "(a file of a few KB can declare 16384x8192 frames: gigabytes and minutes).")
    timeout_s: float = Field(120.0, gt=0, le=MAX_TIMEOUT_S, description="Per-video decode time limit; a video "
                             "past it is a failure.")
    shard_size: int = Field(64, ge=1, description="Videos per shard (the unit of mapping, retry and resume).")

    @model_validator(mode="after")
    def _frames_range(self) -> "FramesConfig":
        if self.min_frames > self.max_frames:
            raise ValueError(f"min_frames ({self.min_frames}) must not exceed max_frames ({self.max_frames})")
        return self


class SampleConfig(StageConfig):
    """Prior-knowledge-infused sampling (docs/method.md section 5)."""

    model: str = Field(..., min_length=1, description="Generator (the frozen SFT model): local folder or hub id.")
    model_revision: str = Field("", description="Recorded in provenance columns; defaults to the folder's hash.")
    backend: Literal["auto", "vllm", "transformers"] = Field("auto", description="auto: vLLM wherever it imports.")
    num_candidates: int = Field(1, ge=1, le=64, description="K candidates per side (the paper: 1).")
    reflection: bool = Field(True, description="Run the self-reflection turn that turns the hint reply into y_w.")
    win_temperature: float = Field(1.0, ge=0, le=5, description="Sampling temperature of the winning side.")
    win_top_p: float = Field(0.9, gt=0, le=1, description="Nucleus top-p of the winning side.")
    lose_temperature: float = Field(1.0, ge=0, le=5, description="Sampling temperature of the losing side.")
    lose_top_p: float = Field(1.0, gt=0, le=1, description="Nucleus top-p of the losing side.")
    lose_frames: int = Field(2, ge=1, le=64, description="Frames of the lean (augmented) view for the losing side.")
    max_new_tokens: int = Field(1024, ge=1, le=32768, description="Generation length limit per response.")
    aug_crop_scale_min: float = Field(0.08, gt=0, le=1, description="RandomResizedCrop area scale, lower bound.")
    aug_crop_scale_max: float = Field(0.3, gt=0, le=1, description="RandomResizedCrop area scale, upper bound.")
    aug_color_jitter_p: float = Field(0.8, ge=0, le=1, description="Probability of ColorJitter(0.4, 0.4, 0.2, 0.1).")
    aug_grayscale_p: float = Field(0.2, ge=0, le=1, description="Probability of grayscale.")
    aug_blur_sigma_min: float = Field(0.1, gt=0, description="GaussianBlur sigma, lower bound.")
    aug_blur_sigma_max: float = Field(2.0, gt=0, description="GaussianBlur sigma, upper bound.")
    aug_hflip_p: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seeds sampling and augmentation: same seed, same data.")
    round: int = Field(0, ge=0, description="Self-improvement round this generation belongs to.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism (GPUs per engine).")
    max_model_len: int = Field(4096, ge=128, description="vLLM context length.")
    max_num_seqs: int = Field(16, ge=1, description="vLLM concurrent sequences.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    shard_size: int = Field(64, ge=1, description="Questions per shard (one engine `generate` call each).")

    @model_validator(mode="after")
    def _ranges(self) -> "SampleConfig":
        if self.aug_crop_scale_min > self.aug_crop_scale_max:
            raise ValueError("aug_crop_scale_min must not exceed aug_crop_scale_max")
        if self.aug_blur_sigma_min > self.aug_blur_sigma_max:
            raise ValueError("aug_blur_sigma_min must not exceed aug_blur_sigma_max")
        if 2 * self.max_new_tokens >= self.max_model_len:  # the reflection prompt carries a whole hint reply
            raise ValueError(f"max_model_len ({self.max_model_len}) must exceed twice max_new_tokens "
                             f"({self.max_new_tokens}): the reflection turn reads one reply and writes another")
        return self


class ScoringConfig(StageConfig):
    """What the stages that score likelihoods share: where (`device`) and in what precision (`scoring_precision`)."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where likelihoods are scored (reflect: the "
                                                   "SFT model; evaluate: the evaluated models); auto: cuda when "
                                                   "available.")
    scoring_precision: ScoringPrecision = Field(
        "auto", description="Precision of the models whose likelihoods are scored (reflect: rbar, which the trust "
        "filter compares; evaluate: preference accuracy, answer_logp). fp32: fp32 weights; bf16-weights-fp32-softmax: "
        "bf16 weights and activations, log-softmax and sums in fp32 (half the memory, tensor-core math); auto: bf16 "
        "on a CUDA GPU with native bf16, fp32 elsewhere. How often bf16 flips the trust filter's decision: "
        "docs/operations.md, Scoring precision.")
    vision_feature_cache_mib: int = Field(2048, ge=0, description="CPU memory (MiB) for the scored model's vision "
                                          "output per video (key and frame indices): every response scored on a "
                                          "video after the first reuses it, so the tower runs once per video, not "
                                          "once per response (0: off).")
    persist_vision_features: bool = Field(False, description="Also keep the vision output per video in "
                                          "`vision_features/` next to the frames table (local or s3://), where the "
                                          "other passes of the run (reflect, train, evaluate) and reruns read it "
                                          "instead of running the tower; named by hashes of the tower and of the "
                                          "video's exact vision input, so a change of either is never served "
                                          "stale. Needs vision_feature_cache_mib > 0.")
    prefix_sharing: bool = Field(True, description="Score the responses to one question on one clip (reflect: the "
                                 "2K candidates; evaluate: a pair's two sides) as ONE sequence [prompt | r1 | ... | "
                                 "rn], the prompt and its video tokens read once (exact up to float summation "
                                 "order). Needs attention that takes a 4-D mask (sdpa, eager); otherwise one "
                                 "sequence per response.")


class ReflectConfig(ScoringConfig):
    """Self-reflection scoring of candidates: judge, prior agreement, SFT likelihood."""

    judge: bool = Field(True, description="Ask the model to rate each candidate (self-reflection judgement).")
    judge_max_tokens: int = Field(16, ge=1, le=1024, description="Length limit of the rating reply.")
    judge_weight: float = Field(1.0, ge=0, description="Weight of the normalised judge rating in the score.")
    prior_f1_weight: float = Field(1.0, ge=0, description="Weight of token F1 against the ground-truth answer.")
    sft_logp_weight: float = Field(0.0, ge=0, description="Weight of the SFT model's mean log-prob in the score.")
    sft_model: str = Field("", description="Model that scores likelihood; empty: the sampling model.")
    batch_size: int = Field(8, ge=1, description="Candidates per likelihood forward.")
    backend: Literal["auto", "vllm", "transformers"] = Field("auto", description="Judge's generation engine; "
                                                             "auto: vLLM wherever it imports.")

    @model_validator(mode="after")
    def _some_weight(self) -> "ReflectConfig":
        if self.judge_weight == self.prior_f1_weight == self.sft_logp_weight == 0:
            raise ValueError("judge_weight, prior_f1_weight and sft_logp_weight are all 0: every candidate would "
                             "score 0 and the ranking would be arbitrary")
        return self


class PairsConfig(StageConfig):
    """Ranking and selection of (chosen, rejected) pairs."""

    trust_filter: bool = Field(True, description="Keep a pair only if the SFT model's rbar(chosen) > rbar(rejected).")
    min_trust_gap: float = Field(0.0, ge=0, description="Required rbar(chosen) - rbar(rejected) under the filter.")
    min_score_margin: float | None = Field(None, description="Required score(chosen) - score(rejected); empty: no "
                                           "score filter (the paper's construction, which K = 1 reproduces).")


class TrainConfig(StageConfig):
    """LeanPO training (docs/method.md section 2) and its baselines."""

    model: str = Field(..., min_length=1, description="Policy to train: local folder or hub id.")
    objective: Literal["leanpo", "simpo", "dpo", "sft"] = Field("leanpo", description="Loss to optimise.")
    beta: float | None = Field(None, gt=0, description="Reward scale; empty: 2.0 (leanpo, simpo) or 0.1 (dpo).")
    gamma: float = Field(0.5, ge=0, description="Target reward margin (leanpo, simpo).")
    label_smoothing: float = Field(0.1, ge=0, lt=0.5, description="eps: smoothing on gated pairs (leanpo).")
    smoothing_threshold: float = Field(0.0, allow_inf_nan=True, description="d: smoothing applies where Delta < d; "
                                       "inf: always.")
    smoothing_form: Literal["symmetric", "conservative"] = Field("symmetric", description="Second smoothing term.")
    sft_weight: float = Field(0.5, ge=0, description="lambda_sft: weight of the chosen-response CE term.")
    learning_rate: float = Field(5e-7, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Schedule after warm-up.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    epochs: float = Field(1.0, gt=0, description="Passes over the pairs.")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimiser steps (-1: from epochs).")
    per_device_batch_size: int = Field(1, ge=1, description="Pairs per device per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    max_length: int = Field(4096, ge=32, description="Token cap per sequence (prompt + response).")
    logits_chunk_size: int = Field(0, ge=0, description="Vocabulary chunk for response log-probs (0: no chunking).")
    prefix_sharing: bool = Field(True, description="Score each pair as ONE sequence [prompt | chosen | rejected], "
                                 "the prompt and its video tokens read once (exact: same loss and gradients as two "
                                 "sequences). Needs attention that takes a 4-D mask (sdpa, eager); with "
                                 "flash_attention_2/3 the trainer uses two sequences per pair and says so.")
    pack_tokens: int = Field(0, ge=0, description="With prefix sharing: pack a micro-batch's pairs, in order, into "
                             "rows of up to this many tokens (a block mask per pair; exact like prefix sharing), so "
                             "short pairs fill the padding of long ones. 0: one row per pair. Off by default: the "
                             "trainer's length-grouped micro-batches leave little padding (0.4% on the demo's "
                             "pairs) and a packed row's dense mask grows with its length squared "
                             "(bench/results/packing.md).")
    freeze_vision: bool = Field(True, description="Freeze the vision tower and projector.")
    vision_feature_cache_mib: int = Field(2048, ge=0, description="CPU memory (MiB) for the frozen vision tower's "
                                          "output per video, computed once and reused by later epochs (0: off; "
                                          "unused when freeze_vision is off or under zero3).")
    persist_vision_features: bool = Field(False, description="Also keep that output in `vision_features/` next "
                                          "to the frames table (local or s3://), shared with the reflect and "
                                          "evaluate passes and reruns that read the same videos with the same tower "
                                          "(features.py). Needs the cache.")
    lora: bool = Field(False, description="Train LoRA adapters (peft) instead of the full language model.")
    lora_rank: int = Field(16, ge=1, description="LoRA rank.")
    deepspeed: Literal["none", "zero2", "zero3"] = Field("zero2", description="DeepSpeed ZeRO stage config.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward.")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seeds initialisation, data order and dropout.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every this many steps (resume point).")
    wall_clock_limit_s: float = Field(24 * 3600, gt=0, le=30 * MAX_TIMEOUT_S, description="The launcher kills "
                                      "training past this.")

    @property
    def effective_beta(self) -> float:
        return self.beta if self.beta is not None else (0.1 if self.objective == "dpo" else 2.0)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if math.isnan(self.smoothing_threshold):
            raise ValueError("smoothing_threshold must be a number or inf, not NaN")
        if self.lora and self.deepspeed == "zero3":
            raise ValueError("lora with deepspeed=zero3 is not supported here; use zero2")
        return self


class EvaluateConfig(ScoringConfig):
    """Evaluation: preference accuracy, answer accuracy, held-out likelihood change, and optionally a standard
    benchmark's accuracy."""

    backend: Literal["auto", "vllm", "transformers"] = Field("auto", description="Generation engine for answers.")
    split: str = Field("test", min_length=1, description="Videos-table split whose questions are answered and "
                       "whose ground-truth answers are scored.")
    max_new_tokens: int = Field(64, ge=1, description="Answer length limit (greedy decoding).")
    max_questions: int = Field(0, ge=0, description="Cap on held-out questions (0: all).")
    max_model_len: int = Field(4096, ge=128, description="Engine context length (prompt + answer).")
    batch_size: int = Field(8, ge=1, description="Sequences per likelihood forward.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Generation seed.")
    benchmark: str = Field("", description="A standard benchmark to answer too: the folder or s3:// prefix of a "
                           "local copy in its published layout (`benchmark_layout`); its accuracy, overall and per "
                           "category, joins the table (leanpo_core/benchmarks.py). Empty: none.")
    benchmark_layout: Literal["videomme", "mvbench", "nextqa"] | None = Field(
        None, description="The layout of `benchmark`: videomme (Video-MME), mvbench (MVBench), nextqa (NExT-QA "
        "multiple choice).")
    benchmark_num_frames: int = Field(16, ge=1, le=1024, description="Frames per benchmark video, uniform over the "
                                      "whole video.")
    benchmark_max_questions: int = Field(0, ge=0, description="Cap on benchmark questions, evenly spaced over the "
                                         "benchmark's files so every category keeps its share (0: all).")
    benchmark_frames: str = Field("", description="Where the benchmark's decoded frames are kept and reused (folder "
                                  "or s3:// prefix); empty: beside the evaluation table, in `benchmarks/`.")

    @model_validator(mode="after")
    def _room_for_prompt(self) -> "EvaluateConfig":
        if self.max_new_tokens >= self.max_model_len:
            raise ValueError(f"max_model_len ({self.max_model_len}) must exceed max_new_tokens "
                             f"({self.max_new_tokens})")
        if self.benchmark and self.benchmark_layout is None:
            raise ValueError("benchmark_layout must name the layout of benchmark (videomme, mvbench or nextqa)")
        return self


class PipelineConfig(StageConfig):
    """All stage configs of one pipeline run, as read from a config file's sections."""

    frames: FramesConfig = Field(default_factory=FramesConfig)
    sample: SampleConfig
    reflect: ReflectConfig = Field(default_factory=ReflectConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    train: TrainConfig
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _lean_view_is_lean(self) -> "PipelineConfig":
        name = "num_frames" if self.frames.sampling == "uniform" else "max_frames"
        frames = getattr(self.frames, name)
        if self.sample.lose_frames >= frames:
            raise ValueError(f"sample.lose_frames ({self.sample.lose_frames}) must be below frames.{name} ({frames}):"
                             " the losing side's view would not be lean")
        return self


C = TypeVar("C", bound=StageConfig)


class ConfigError(BadInput):
    """A config file or value is invalid; the message names the file and field."""


def read_document(path: str | Path) -> dict:
    """A YAML or JSON mapping from `path` (by its suffix; YAML otherwise, a superset of JSON); ConfigError names the
    file when it cannot be read, parsed, or is not a mapping."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    if path.suffix == ".json":
        parse, errors, kind = json.loads, json.JSONDecodeError, "JSON"
    else:
        import yaml

        parse, errors, kind = (lambda t: yaml.safe_load(t) or {}), yaml.YAMLError, "YAML"
    try:
        data = parse(text)
    except errors as exc:
        raise ConfigError(f"invalid config {path}: not valid {kind} ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {path}: it must hold a mapping of fields, not {type(data).__name__}")
    return data


def load_config(path: str | Path, cls: type[C]) -> C:
    """Read a YAML or JSON file into `cls`, raising ConfigError that names the file and the bad field."""
    data = read_document(path)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config {path}:\n{exc}") from exc
