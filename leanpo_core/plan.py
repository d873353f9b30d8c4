"""Plan tokens and GPU memory per stage before any work starts: from config.json alone, no weights, no torch model.

    python -m leanpo_core.plan --model /models/qwen2-vl-7b --config run.yaml --gpus 8 --gpu-memory-gib 80
    python -m leanpo_core.plan --model qwen2-vl-2b --frames 16,32,64 --json     # a published shape (PUBLISHED)
    leanpo plan --model /tmp/toy-qwen2vl --frames 8,64                           # the same, through the CLI

For each frame count it prints the video tokens, the tokens per sequence, the parameters (vision tower, projector,
language model; trainable or frozen as the TrainConfig says) and the estimated peak memory per GPU of: the LeanPO
training step (the lean path: vision tower once per pair, logits only at response positions), the naive step for
comparison (vision tower once per sequence, full-vocabulary logits), the reflect and evaluate scoring forwards, and
vLLM sampling; a setting that does not fit says the nearest one that does.

The memory model (bytes; N parameters, N_t trainable, G GPUs, s the ZeRO stage):
  states      weights + fp32 master + AdamW moments, as the setup keeps them. DeepSpeed bf16: weights 2N (/G at
              s=3), master 4N_t and moments 8N_t (/G at s>=1), grads 2N_t (/G at s>=2); no DeepSpeed (DDP, autocast):
              fp32 weights 4N, grads 4N_t (+4N_t of DDP buckets over >1 GPU), moments 8N_t
  activations the language model over B rows of P + 2R tokens with prefix sharing (the default), else 2B
              sequences of L = P + R tokens (B pairs per GPU): with checkpointing each layer's input (tokens*d)
              is kept and one layer is recomputed at a time; without, every layer keeps
              (6d + 5*heads*head_dim + 4I) values per token; plus the sdpa mask (length^2 bytes per row)
  logits      12 bytes per logit in backward (fp32 log-softmax output, its incoming and its outgoing gradient),
              over the response positions only (lean) or over every position (naive); chunked: one chunk, plus
              the output projection's fp32 gradient (4*V*d), so chunking pays only for long responses
  vision      frozen and without autograd: one block's activations over the video's patches at a time (naive:
              twice the patches)
  peak        the largest of: the logits' backward, the backward of the layers (checkpoints + one layer + the
              gradients so far), the optimizer step (gradients + states + its temporaries)
  scoring     reflect/evaluate, forward only: fp32 weights (bf16 where the stage's config says so) + the largest
              of one layer over the batch, the response logits (8 bytes each) and the vision tower
  vLLM        bf16 weights / TP + a profiling forward + 1 GiB outside torch (CUDA graphs) + the KV cache of one
              max_model_len sequence, within gpu_memory_utilization (0.9) of the GPU
A setting fits when its peak is at most 95% of the GPU's memory less 1 GiB (CUDA context, cuBLAS workspace, NCCL
buffers; the caching allocator's fragmentation). The estimate against measurements: README "Planning memory before a
run" (the bench/video_step_bench.py toy and the H100 figures of docs/method.md section 7).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

from leanpo_core.config import (ConfigError, EvaluateConfig, FramesConfig, ReflectConfig, SampleConfig,
                                TrainConfig)
from leanpo_core.decode import output_size

GIB = 2**30
CONTEXT_GIB = 1.0  # CUDA context, cuBLAS workspace, NCCL buffers: outside torch's allocator
USABLE_SHARE = 0.95  # the rest: the caching allocator's fragmentation
VLLM_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default; the project leaves it as it is
LOGIT_BACKWARD_BYTES = 12  # per logit: fp32 log-softmax output + incoming + outgoing gradient (measured: 12.0)
CHUNK = 4096  # the logits_chunk_size suggested when the response logits do not fit

# Published shapes, transcribed from the public config.json (and, for Qwen, preprocessor_config.json) of
# Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct,
# llava-hf/LLaVA-NeXT-Video-7B-hf and llava-hf/llava-onevision-qwen2-7b-ov-hf (dimensions only; no hub is reachable
# from this project's machines, so they were not re-read here). Qwen keeps text fields at the top level as those
# files do; LLaVA nests them in text_config.
_QWEN_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2}
_QWEN2_VL_VISION = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_channels": 3,
                    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
PUBLISHED: dict[str, dict] = {
    "qwen2-vl-2b": {"model_type": "qwen2_vl", "hidden_size": 1536, "intermediate_size": 8960,
                    "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                    "vocab_size": 151936, "max_position_embeddings": 32768, "tie_word_embeddings": True,
                    "vision_config": {**_QWEN2_VL_VISION, "hidden_size": 1536}, "preprocessor": _QWEN_PIXELS},
    "qwen2-vl-7b": {"model_type": "qwen2_vl", "hidden_size": 3584, "intermediate_size": 18944,
                    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                    "vocab_size": 152064, "max_position_embeddings": 32768, "tie_word_embeddings": False,
                    "vision_config": {**_QWEN2_VL_VISION, "hidden_size": 3584}, "preprocessor": _QWEN_PIXELS},
    "qwen2.5-vl-7b": {"model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944,
                      "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                      "vocab_size": 152064, "max_position_embeddings": 128000, "tie_word_embeddings": False,
                      "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                                        "num_heads": 16, "in_channels": 3, "out_hidden_size": 3584,
                                        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                                        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                                        "tokens_per_second": 2},
                      "preprocessor": _QWEN_PIXELS},
    "llava-next-video-7b": {"model_type": "llava_next_video", "vision_feature_layer": -2,
                            "vision_feature_select_strategy": "default", "spatial_pool_mode": "average",
                            "spatial_pool_stride": 2, "tie_word_embeddings": False,
                            "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                                            "num_hidden_layers": 32, "num_attention_heads": 32,
                                            "num_key_value_heads": 32, "vocab_size": 32064,
                                            "max_position_embeddings": 4096},
                            "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024,
                                              "intermediate_size": 4096, "num_hidden_layers": 24,
                                              "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                                              "projection_dim": 768}},
    "llava-onevision-7b": {"model_type": "llava_onevision", "vision_feature_layer": -1,
                           "vision_feature_select_strategy": "full", "tie_word_embeddings": False,
                           "text_config": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                                           "num_hidden_layers": 28, "num_attention_heads": 28,
                                           "num_key_value_heads": 4, "vocab_size": 152128,
                                           "max_position_embeddings": 32768, "tie_word_embeddings": False},
                           "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152,
                                             "intermediate_size": 4304, "num_hidden_layers": 26,
                                             "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
                                             "vision_use_head": False}},
}
# Qwen video processors' class defaults in transformers 5, for a config.json without processor files.
_QWEN_VIDEO_DEFAULT = {"min_pixels": 128 * 28 * 28, "max_pixels": 768 * 28 * 28}


# ---------------------------------------------------------------- the model's shape


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the plan needs of a model: language-model and vision-tower dimensions, and the video processor's grid."""

    name: str
    family: str  # one of leanpo_core.models.ADAPTERS
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool  # Qwen2: biases on q, k, v; LLaMA: attention_bias, which also puts one on o_proj
    max_positions: int
    vision_width: int
    vision_depth: int
    vision_mlp: int
    patch: int
    image_size: int = 0  # LLaVA: the side every frame is resized to
    temporal_patch: int = 1
    merge: int = 1  # Qwen: patches merged per side into one token; LLaVA: the video pooling stride
    in_channels: int = 3
    vision_out: int = 0  # Qwen: merger output width
    feature_layers: int = 1  # LLaVA: vision layers concatenated into the projector's input
    vision_head: bool = False  # SigLIP attention-pooling head
    min_pixels: int = 0
    max_pixels: int = 0
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000


def _processor_file(folder: Path) -> dict:
    """The video processor's settings of a model folder: processor_config.json (transformers 5), else
    video_preprocessor_config.json, else preprocessor_config.json (older checkpoints), else {}."""
    combined = folder / "processor_config.json"
    if combined.is_file():
        video = json.loads(combined.read_text()).get("video_processor")
        if video:
            return video
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    return {}


def _pixel_limits(processor: dict) -> tuple[int, int]:
    size = processor.get("size") or {}
    low = processor.get("min_pixels") or size.get("shortest_edge") or _QWEN_VIDEO_DEFAULT["min_pixels"]
    high = processor.get("max_pixels") or size.get("longest_edge") or _QWEN_VIDEO_DEFAULT["max_pixels"]
    return int(low), int(high)


def read_model(model: str | Path) -> ModelSpec:
    """The ModelSpec of a PUBLISHED name, a model folder or a config.json path (no weights are read)."""
    if str(model) in PUBLISHED:
        config = dict(PUBLISHED[str(model)])
        processor = config.pop("preprocessor", {})
    else:
        path = Path(model)
        folder = path if path.is_dir() else path.parent
        file = folder / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"--model {model}: neither a folder with config.json, a config.json, nor one of "
                              f"{sorted(PUBLISHED)}")
        config, processor = json.loads(file.read_text()), _processor_file(folder)
    try:
        return _spec(str(model), config, processor)
    except KeyError as exc:
        raise ConfigError(f"--model {model}: its config lacks {exc}") from exc


def _spec(name: str, config: dict, processor: dict) -> ModelSpec:
    family = config.get("model_type")
    if family not in ("qwen2_vl", "qwen2_5_vl", "llava_next_video", "llava_onevision"):  # models.ADAPTERS (torch)
        raise ConfigError(f"--model {name}: unsupported model_type {family!r}; the plan knows qwen2_vl, qwen2_5_vl, "
                          "llava_next_video, llava_onevision")
    text = {**config, **config.get("text_config", {})}
    vision = config.get("vision_config", {})
    heads = text["num_attention_heads"]
    common = dict(name=name, family=family, hidden=text["hidden_size"], layers=text["num_hidden_layers"],
                  heads=heads, kv_heads=text.get("num_key_value_heads") or heads,
                  head_dim=text.get("head_dim") or text["hidden_size"] // heads,
                  intermediate=text["intermediate_size"], vocab=text["vocab_size"],
                  tied=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
                  qkv_bias=text.get("model_type") != "llama" or bool(text.get("attention_bias")),
                  max_positions=text.get("max_position_embeddings") or 0)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        low, high = _pixel_limits(processor)
        width = vision["embed_dim"] if family == "qwen2_vl" else vision["hidden_size"]
        mlp = int(width * vision.get("mlp_ratio", 4)) if family == "qwen2_vl" else vision["intermediate_size"]
        out = vision["hidden_size"] if family == "qwen2_vl" else vision["out_hidden_size"]
        return ModelSpec(**common, vision_width=width, vision_depth=vision["depth"], vision_mlp=mlp,
                         patch=processor.get("patch_size") or vision.get("patch_size", 14),
                         temporal_patch=processor.get("temporal_patch_size") or vision.get("temporal_patch_size", 2),
                         merge=processor.get("merge_size") or vision.get("spatial_merge_size", 2),
                         in_channels=vision.get("in_channels", vision.get("in_chans", 3)), vision_out=out,
                         min_pixels=low, max_pixels=high,
                         cap_pixels_per_frame=bool(processor.get("cap_pixels_per_frame")),
                         max_video_tokens=processor.get("max_video_tokens") or 128000)
    layer = config.get("vision_feature_layer", -1)
    return ModelSpec(**common, vision_width=vision["hidden_size"], vision_depth=vision["num_hidden_layers"],
                     vision_mlp=vision["intermediate_size"], patch=vision["patch_size"],
                     image_size=vision["image_size"], merge=config.get("spatial_pool_stride", 2),
                     in_channels=vision.get("num_channels", 3),
                     feature_layers=len(layer) if isinstance(layer, list) else 1,
                     vision_head=bool(vision.get("vision_use_head", False)))


@dataclasses.dataclass(frozen=True)
class Params:
    """Parameter counts by part (the projector: Qwen's patch merger, LLaVA's projector and image_newline)."""

    vision: int
    projector: int
    language: int  # embeddings and decoder layers
    lm_head: int  # 0 when tied to the embeddings
    layer: int  # one decoder layer

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.language + self.lm_head


def param_counts(spec: ModelSpec) -> Params:
    """Exact parameter counts of the Hugging Face model `spec` describes (checked against meta-device models)."""
    d, hd, e, mlp, p = spec.hidden, spec.head_dim, spec.vision_width, spec.vision_mlp, spec.patch
    attn = d * spec.heads * hd + 2 * d * spec.kv_heads * hd + spec.heads * hd * d
    attn += (spec.heads + 2 * spec.kv_heads) * hd if spec.qkv_bias else 0
    attn += d if spec.qkv_bias and spec.family == "llava_next_video" else 0
    layer = attn + 3 * d * spec.intermediate + 2 * d
    language = spec.vocab * d + spec.layers * layer + d
    if spec.family.startswith("qwen"):
        merged = e * spec.merge**2
        vision = spec.in_channels * spec.temporal_patch * p * p * e
        if spec.family == "qwen2_vl":  # LayerNorms, plain MLP
            vision += spec.vision_depth * (4 * e + 4 * e * e + 4 * e + 2 * e * mlp + mlp + e)
            projector = 2 * e + merged * merged + merged + merged * spec.vision_out + spec.vision_out
        else:  # RMSNorms, gated MLP with biases
            vision += spec.vision_depth * (2 * e + 4 * e * e + 4 * e + 3 * e * mlp + 2 * mlp + e)
            projector = e + merged * merged + merged + merged * spec.vision_out + spec.vision_out
    else:
        grid = (spec.image_size // p) ** 2
        block = 4 * e + 4 * e * e + 4 * e + 2 * e * mlp + mlp + e
        if spec.family == "llava_next_video":  # CLIP: class token, bias-free patches, pre- and post-LayerNorm
            vision = e + spec.in_channels * p * p * e + (grid + 1) * e + 2 * e + spec.vision_depth * block + 2 * e
        else:  # SigLIP: patches with bias, no class token, post-LayerNorm, optional pooling head
            vision = spec.in_channels * p * p * e + e + grid * e + spec.vision_depth * block + 2 * e
            vision += (e + 4 * e * e + 4 * e + 2 * e + 2 * e * mlp + mlp + e) if spec.vision_head else 0
        projector = e * spec.feature_layers * d + d + d * d + d + d
    return Params(vision=vision, projector=projector, language=language, lm_head=0 if spec.tied else spec.vocab * d,
                  layer=layer)


def lora_params(spec: ModelSpec, rank: int) -> int:
    """LoRA A and B of the seven projections of every decoder layer (leanpo_core.train._add_lora's targets)."""
    d, q, kv, i = spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim, spec.intermediate
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]
    return spec.layers * rank * sum(a + b for a, b in shapes)


# ---------------------------------------------------------------- tokens


def video_tokens(spec: ModelSpec, frames: int, width: int, height: int) -> tuple[int, int]:
    """(language-model tokens, vision-tower patches) of one video of `frames` frames of width x height pixels,
    as the family's processor counts them (Qwen: smart_resize to the pixel budget, 2 frames per temporal patch,
    merge x merge patches per token; LLaVA: frames resized to the tower's image_size, pooled)."""
    if spec.family.startswith("qwen"):
        factor = spec.patch * spec.merge
        high = spec.max_pixels
        if spec.cap_pixels_per_frame:  # qwen-vl-utils' total-video budget, as the processor applies it
            total = int(spec.max_video_tokens * factor * factor * 0.9)
            high = max(min(high, total * spec.temporal_patch // frames), int(spec.min_pixels * 1.05))
        h, w = _smart_resize(height, width, factor, spec.min_pixels, high)
        steps = math.ceil(frames / spec.temporal_patch)
        return steps * (h // factor) * (w // factor), steps * (h // spec.patch) * (w // spec.patch)
    grid = spec.image_size // spec.patch
    patches = frames * (grid * grid + (1 if spec.family == "llava_next_video" else 0))
    if spec.family == "llava_next_video":
        return frames * (grid * grid // spec.merge**2), patches
    return frames * math.ceil(grid / 2) ** 2 + 1, patches  # OneVision: bilinear pooling, one newline per video


def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' Qwen2-VL smart_resize: sides divisible by factor, area within [min_pixels, max_pixels]."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


# ---------------------------------------------------------------- memory


@dataclasses.dataclass(frozen=True)
class Setup:
    """How a training step holds its tensors: bytes per parameter of each kind, and how ZeRO splits them."""

    name: str
    weight: int  # per parameter (all of them): the weights the step computes with
    grad: int  # per trainable parameter
    master: int  # fp32 master copy per trainable parameter (DeepSpeed's mixed precision)
    moments: int  # AdamW's two moments per trainable parameter
    step_temp: int  # optimizer-step temporaries per trainable parameter
    hidden: int  # per value of the residual stream (the checkpointed layer inputs)
    act: int  # per value of every other activation
    zero: int | None = None  # DeepSpeed ZeRO stage; None: no DeepSpeed (DDP over >1 GPU)
    gpus: int = 1

    @property
    def ddp_buckets(self) -> int:
        """DDP's flat gradient buckets, a second copy of the gradients, per trainable parameter."""
        return self.grad if self.zero is None and self.gpus > 1 else 0


def training_setup(config: TrainConfig, gpus: int, zero: int | None | str = "config") -> Setup:
    """The Setup `leanpo_core.train` runs `config` with on GPUs (precision auto = bf16).

    No DeepSpeed: the Trainer's autocast over fp32 weights (bf16 matmuls, an fp32 residual stream), fused AdamW.
    DeepSpeed (deployments/ds_zero*.json): bf16 weights and gradients, fp32 master and moments partitioned from
    stage 1, the gradients from stage 2, the weights at stage 3; the step converts its gradient partition to fp32.
    zero: "config" takes config.deepspeed; None or 0-3 overrides it.
    """
    stage = {"none": None, "zero2": 2, "zero3": 3}[config.deepspeed] if zero == "config" else zero
    bf16 = config.precision != "fp32"
    if stage is None:
        return Setup("ddp+autocast" if bf16 else "ddp fp32", weight=4, grad=4, master=0, moments=8, step_temp=0,
                     hidden=4, act=2 if bf16 else 4, zero=None, gpus=gpus)
    if bf16:  # stage 0 (BF16_Optimizer) keeps whole fp32 gradients next to the bf16 ones
        return Setup(f"zero{stage} bf16", weight=2, grad=2 + (4 if stage == 0 else 0), master=4, moments=8,
                     step_temp=0 if stage == 0 else 4, hidden=2, act=2, zero=stage, gpus=gpus)
    return Setup(f"zero{stage} fp32", weight=4, grad=4, master=4 if stage else 0, moments=8, step_temp=0, hidden=4,
                 act=4, zero=stage, gpus=gpus)


# A plain PyTorch step on one GPU: bf16 weights without a master copy, torch AdamW (foreach: one parameter-sized
# temporary in the step), as in bench/gpu_step.py and the H100 figures of docs/method.md section 7.
PURE_BF16_TORCH_ADAMW = Setup("bf16 torch AdamW", weight=2, grad=2, master=0, moments=4, step_temp=2, hidden=2,
                              act=2)
# The CPU benchmark (bench/video_step_bench.py): fp32 weights, torch AdamW (single-tensor on CPU), one process.
FP32_TORCH_ADAMW = Setup("fp32 torch AdamW", weight=4, grad=4, master=0, moments=8, step_temp=0, hidden=4, act=4)


@dataclasses.dataclass(frozen=True)
class Step:
    """One training micro-batch on one GPU: `pairs` pairs, so 2*pairs sequences of `tokens` tokens each, or with
    `prefix_shared` one `[prompt | chosen | rejected]` row of tokens + response tokens per pair."""

    pairs: int
    tokens: int  # per sequence, prompt + response
    response: int  # scored tokens per sequence
    patches: int  # vision-tower patches per video
    video_tokens: int  # language-model tokens per video
    checkpointing: bool = True
    chunk: int = 0  # logits_chunk_size; 0: the whole vocabulary at once
    lora_rank: int = 0  # 0: the whole language model trains
    vision_trains: bool = False
    lean: bool = True  # False: the naive step (vision once per sequence, full-vocabulary logits)
    prefix_shared: bool = False  # TrainConfig.prefix_sharing (lean only): the prompt once per pair


def _layer_bytes(spec: ModelSpec, act: int) -> tuple[int, int]:
    """(kept for backward, extra while its backward runs) bytes per token of one decoder layer.

    Kept: two RMSNorms (fp32 input and normalised output), q, k and v repeated to every head, the attention
    output and its log-sum-exp, the o_proj input, the MLP's gate, activation, up and product.
    """
    d, qd, i = spec.hidden, spec.heads * spec.head_dim, spec.intermediate
    kept = 2 * d * (4 + act) + 5 * qd * act + 4 * spec.heads + 4 * i * act
    return kept, (3 * i + 2 * d) * act


def _vision_bytes(spec: ModelSpec, patches: int, act: int) -> int:
    """The frozen tower's forward: its fp32 pixel input plus one block's activations over all patches."""
    pixels = patches * spec.in_channels * spec.temporal_patch * spec.patch**2 * 4
    return pixels + patches * (6 * spec.vision_width + 2 * spec.vision_mlp) * act


def train_memory(spec: ModelSpec, setup: Setup, step: Step) -> dict[str, float]:
    """Estimated bytes per GPU of one training step: the parts and `peak` (see the module docstring)."""
    params = param_counts(spec)
    d, vocab, layers = spec.hidden, spec.vocab, spec.layers
    lm = params.language + params.lm_head
    trainable = lora_params(spec, step.lora_rank) if step.lora_rank else lm
    trainable += params.vision + params.projector if step.vision_trains else 0
    gpus, stage = setup.gpus, setup.zero

    def split(count: float, from_stage: int) -> float:
        return count / gpus if stage is not None and stage >= from_stage else count

    weights = setup.weight * split(params.total, 3)
    if stage == 3:  # gathered for compute: the largest module, and the next one prefetched
        weights += 2 * setup.weight * max(vocab * d, params.layer)
    optimizer = (setup.master + setup.moments) * split(trainable, 1)
    grads = setup.grad * split(trainable, 2)
    if stage is not None and stage >= 2:  # reduce buckets ("auto": hidden^2 values)
        grads += 2 * setup.grad * d * d
    static = weights + optimizer + setup.ddp_buckets * trainable
    in_backward = 0.0 if stage is not None else grads  # DeepSpeed's gradient buffers are allocated once
    static += grads - in_backward
    seqs = 2 * step.pairs  # scored sequences
    rows_lm, length = (step.pairs, step.tokens + step.response) if step.prefix_shared else (seqs, step.tokens)
    tokens = rows_lm * length
    kept, extra = _layer_bytes(spec, setup.act)
    rope = 2 * tokens * spec.head_dim * setup.act
    mask = rows_lm * length**2 * (1 + setup.act)  # the (padding or prefix-sharing) mask, and sdpa's additive copy
    checkpoint = tokens * d * setup.hidden  # one layer's input
    videos = step.pairs if step.lean else seqs
    vision = _vision_bytes(spec, videos * step.patches, setup.act)
    copies = 1 if step.prefix_shared else 2  # features, and their copy for each row that shows them
    vision += (1 + copies) * step.pairs * step.video_tokens * d * setup.act
    if step.vision_trains:
        vision += spec.vision_depth * videos * step.patches * spec.vision_width * setup.act
    rows = seqs * (step.response if step.lean else step.tokens)
    if step.lean and step.chunk and step.chunk < vocab:  # one chunk's logits; the fp32 weight gradient
        logits = rows * step.chunk * LOGIT_BACKWARD_BYTES + 4 * vocab * d + 8 * rows * d
    else:
        logits = rows * vocab * LOGIT_BACKWARD_BYTES
    head_grad = 0.0 if step.lora_rank or stage is not None else setup.grad * vocab * d
    if step.checkpointing:
        stored = layers * checkpoint
        layer_phase = kept * tokens + extra * tokens + max(stored, checkpoint + in_backward)
    else:
        stored = layers * kept * tokens
        layer_phase = stored + extra * tokens + head_grad
    shared = rope + mask + (4 + setup.act) * tokens * d  # + the final norm
    phases = {"vision forward": static + vision,
              "logits backward": static + shared + stored + logits + head_grad,
              "layers backward": static + shared + layer_phase,
              "optimizer step": static + in_backward + setup.step_temp * split(trainable, 1)}
    where = max(phases, key=phases.get)
    return {"weights": weights, "optimizer": optimizer, "grads": grads, "activations": stored + shared,
            "logits": logits, "vision": vision, "peak": phases[where], "peak_phase": where,
            "trainable": trainable}


def scoring_memory(spec: ModelSpec, batch: int, tokens: int, response: int, patches: int, bf16: bool) -> dict:
    """Bytes of the reflect/evaluate likelihood pass: `batch` sequences (each its own video), forward only."""
    act = 2 if bf16 else 4
    weights = param_counts(spec).total * act
    d, qd, i = spec.hidden, spec.heads * spec.head_dim, spec.intermediate
    total = batch * tokens
    layer = total * (2 * d + 4 * qd + 3 * i) * act + batch * tokens**2 * (1 + act)
    logits = batch * response * spec.vocab * 8  # fp32 logits and their log-softmax
    vision = _vision_bytes(spec, batch * patches, act)
    return {"weights": weights, "activations": layer, "logits": logits, "vision": vision,
            "peak": weights + max(layer, logits + total * d * act, vision)}


def vllm_memory(spec: ModelSpec, tensor_parallel: int, max_model_len: int, max_num_seqs: int,
                patches: int) -> dict:
    """Bytes per GPU vLLM needs: bf16 weights, its profiling forward (16384 batched tokens, the encoder on one
    video, the sampler's logits), 1 GiB outside torch (CUDA graphs), and the KV cache of one max_model_len
    sequence; `kv_per_token` sizes the rest of the cache."""
    weights = param_counts(spec).total * 2 / tensor_parallel
    d, qd, i = spec.hidden, spec.heads * spec.head_dim, spec.intermediate
    batched = max(16384, max_model_len)
    forward = batched * (2 * d + 4 * qd + 3 * i) * 2 / tensor_parallel + max_num_seqs * spec.vocab * 8
    forward = max(forward, _vision_bytes(spec, patches, 2))
    kv_per_token = 2 * spec.layers * max(1, spec.kv_heads // tensor_parallel) * spec.head_dim * 2
    return {"weights": weights, "activations": forward, "non_torch": GIB, "kv_per_token": kv_per_token,
            "peak": weights + forward + GIB + kv_per_token * max_model_len}


def usable_bytes(gpu_memory_gib: float) -> float:
    """What a torch process can allocate on a GPU of that size (see the module docstring)."""
    return (USABLE_SHARE * gpu_memory_gib - CONTEXT_GIB) * GIB


# ---------------------------------------------------------------- the plan


@dataclasses.dataclass
class Stages:
    """The stage configs the plan reads (a `leanpo run` config's sections; defaults where a section is absent)."""

    train: TrainConfig
    frames: FramesConfig
    sample: SampleConfig
    reflect: ReflectConfig
    evaluate: EvaluateConfig


def read_stages(path: str | Path | None, model: str) -> Stages:
    """Stages from a YAML/JSON file with sections train/frames/sample/reflect/evaluate (others are ignored, as
    `manifest` or `root` of a pipeline config); `model` fills train.model and sample.model where absent."""
    data: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid config {path}: not valid YAML/JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"invalid config {path}: expected a mapping of sections")
    return stages_from(data, model, str(path))


def stages_from(data: dict, model: str, source: str = "config") -> Stages:
    """Stages from a mapping of sections (mappings or the stage config objects a validated flow holds); `model`
    fills train.model and sample.model where absent."""
    from pydantic import BaseModel, ValidationError

    sections = {}
    for name, cls in (("train", TrainConfig), ("frames", FramesConfig), ("sample", SampleConfig),
                      ("reflect", ReflectConfig), ("evaluate", EvaluateConfig)):
        section = data.get(name) or {}
        values = section.model_dump(exclude_unset=True) if isinstance(section, BaseModel) else dict(section)
        if name in ("train", "sample"):
            values.setdefault("model", model)
        try:
            sections[name] = cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(f"invalid config {source} [{name}]:\n{exc}") from exc
    return Stages(**sections)


def run_model(data: dict) -> str:
    """The model a run config trains or samples with (train.model, else sample.model): the one its plan is for."""
    for name in ("train", "sample"):
        section = data.get(name) or {}
        model = getattr(section, "model", None) if not isinstance(section, dict) else section.get("model")
        if model:
            return str(model)
    raise ConfigError("the config names no model (train.model or sample.model): nothing to plan")


def plan_run(data: dict, gpus: int = 1, gpu_memory_gib: float = 80.0, source: str = "config") -> tuple[Plan, list]:
    """The plan of a `leanpo run` config and the rows that would not fit (the naive training step, shown for
    comparison, is never one of them): what `leanpo run --plan` prints and refuses on."""
    model = run_model(data)
    result = plan(read_model(model), stages_from(data, model, source), gpus, gpu_memory_gib)
    return result, [r for r in result.rows if not r.fits and r.stage != "train (naive step)"]


@dataclasses.dataclass
class Row:
    """One stage at one frame count."""

    stage: str
    frames: int
    video_tokens: int
    tokens: int  # per sequence: prompt (video + text) + response
    setting: str
    peak_gib: float
    parts_gib: dict[str, float]
    fits: bool
    advice: str = ""
    peak_phase: str = ""  # training: the part of the step where the peak falls


@dataclasses.dataclass
class Plan:
    """The report: the model, the GPUs, parameters by part, and one Row per stage and frame count."""

    model: str
    family: str
    gpus: int
    gpu_memory_gib: float
    usable_gib: float
    frame_size: tuple[int, int]  # (width, height) the processor receives
    params: dict[str, int]
    rows: list[Row]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _gib(parts: dict) -> dict[str, float]:
    return {k: round(v / GIB, 2) for k, v in parts.items()
            if isinstance(v, (int, float)) and k not in ("trainable", "kv_per_token")}


def _scoring_bf16(config) -> bool:
    """Whether a scoring stage keeps bf16 weights on the planned GPU: `scoring_precision` naming bf16, or `auto`
    (bf16 on a CUDA device with native bf16, which the plan assumes) unless the stage's device is the CPU."""
    value = str(getattr(config, "scoring_precision", None) or getattr(config, "precision", None) or "fp32")
    return "bf16" in value or (value == "auto" and getattr(config, "device", "auto") != "cpu")


class _Trainer:
    """Training estimates of one model under one set of stage configs, with the knobs the advice turns."""

    def __init__(self, spec: ModelSpec, stages: Stages, size: tuple[int, int], prompt_tokens: int, response: int,
                 gpus: int, zero: int | None | str):
        self.spec, self.stages, self.size = spec, stages, size
        self.prompt_tokens, self.response = prompt_tokens, response
        t = stages.train
        stage = {"none": None, "zero2": 2, "zero3": 3}[t.deepspeed] if zero == "config" else zero
        self.knobs = dict(checkpointing=t.gradient_checkpointing, chunk=t.logits_chunk_size,
                          pairs=t.per_device_batch_size, zero=stage, gpus=gpus, lora=t.lora)

    def prompt(self, frames: int) -> int:
        return video_tokens(self.spec, frames, *self.size)[0] + self.prompt_tokens

    def tokens(self, frames: int) -> tuple[int, int, int, int]:
        """(video tokens, patches, tokens per sequence, scored response tokens) under train.max_length."""
        video, patches = video_tokens(self.spec, frames, *self.size)
        prompt = video + self.prompt_tokens
        length = prompt + self.response
        if prompt < self.stages.train.max_length:  # the trainer cuts the response tail past max_length
            length = min(length, self.stages.train.max_length)
        return video, patches, length, length - prompt

    def memory(self, frames: int, lean: bool = True, **changes) -> dict:
        k = {**self.knobs, **changes}
        video, patches, length, response = self.tokens(frames)
        setup = training_setup(self.stages.train, k["gpus"], k["zero"])
        step = Step(pairs=k["pairs"], tokens=length, response=response, patches=patches, video_tokens=video,
                    checkpointing=k["checkpointing"], chunk=k["chunk"],
                    lora_rank=self.stages.train.lora_rank if k["lora"] else 0,
                    vision_trains=not self.stages.train.freeze_vision, lean=lean,
                    prefix_shared=lean and self.stages.train.prefix_sharing)
        return train_memory(self.spec, setup, step)

    def setting(self) -> str:
        k = self.knobs
        parts = [training_setup(self.stages.train, k["gpus"], k["zero"]).name, f"{k['gpus']} GPU(s)",
                 f"{k['pairs']} pair(s)/GPU", "checkpointing" if k["checkpointing"] else "no checkpointing"]
        parts += [f"logits chunk {k['chunk']}"] if k["chunk"] else []
        parts += [f"LoRA r{self.stages.train.lora_rank}"] if k["lora"] else []
        return ", ".join(parts)

    def advice(self, frames: int, usable: float) -> str:
        """The nearest setting that fits (fewest changes, then fewest GPUs), and the most frames that fit as is."""
        k = self.knobs
        groups: list[list[tuple[str, dict]]] = [
            [("gradient_checkpointing: true", {"checkpointing": True})] if not k["checkpointing"] else [],
            [(f"logits_chunk_size: {CHUNK}", {"chunk": CHUNK})] if not k["chunk"] else [],
            [("per_device_batch_size: 1", {"pairs": 1})] if k["pairs"] > 1 else [],
            [] if k["lora"] else ([("deepspeed: zero3", {"zero": 3})] if k["zero"] != 3 else [])
            + [(f"deepspeed: zero3 over >= {g} GPUs", {"zero": 3, "gpus": g}) for g in (2, 4, 8, 16, 32, 64)
               if g > k["gpus"]]
            + [("lora: true", {"lora": True, "zero": 2 if k["zero"] == 3 else k["zero"]})],
        ]
        combos = [[c for c in combo if c] for combo in itertools.product(*[[None, *g] for g in groups])]
        combos.sort(key=lambda combo: (len(combo), max([c[1].get("gpus", 0) for c in combo], default=0)))

        def fits(combo) -> bool:
            return self.memory(frames, **{key: v for _, change in combo for key, v in change.items()})["peak"] <= usable

        fitting = [combo for combo in combos if combo and fits(combo)]
        full = next((c for c in fitting if not any("lora" in change for _, change in c)), None)
        lora = next((c for c in fitting if any("lora" in change for _, change in c)), None)
        advice = []
        more_gpus = full is not None and any("gpus" in change for _, change in full)
        for combo in (full, lora if full is None or more_gpus or len(lora or ()) < len(full) else None):
            if combo:
                text = " + ".join(t for t, _ in combo)
                advice.append(f"{'needs' if 'GPUs' in text else 'fits with'} {text}")
        step = self.spec.temporal_patch
        fewer = next((f for f in range(frames - 1, 0, -1) if f % step == 0 and self.memory(f)["peak"] <= usable), None)
        advice += [f"reduce num_frames to {fewer}"] if fewer else []
        return "; or ".join(advice) or "does not fit in any setting tried"


def plan(spec: ModelSpec, stages: Stages, gpus: int = 1, gpu_memory_gib: float = 80.0,
         frame_counts: list[int] | None = None, frame_size: tuple[int, int] | None = None,
         prompt_tokens: int = 64, response_tokens: int | None = None, zero: int | None | str = "config") -> Plan:
    """Tokens and peak memory per GPU of every GPU stage at each frame count, with advice where one does not fit.

    frame_size: the videos' (width, height) before frames.max_side (default: square max_side frames, the most
    pixels a max_side allows); prompt_tokens: chat template and question around the video; response_tokens:
    default sample.max_new_tokens + the end-of-reply token.
    """
    f = stages.frames
    counts = frame_counts or [f.num_frames if f.sampling == "uniform" else f.max_frames]
    source = frame_size or (f.max_side, f.max_side)
    size = output_size(source[0], source[1], f.max_side)
    response = response_tokens or stages.sample.max_new_tokens + 1
    usable = usable_bytes(gpu_memory_gib)
    trainer = _Trainer(spec, stages, size, prompt_tokens, response, gpus, zero)
    rows = []
    for frames in counts:
        video, patches, _, _ = trainer.tokens(frames)
        prompt = video + prompt_tokens
        rows += _train_rows(trainer, frames, usable)
        rows += [_scoring_row(spec, stage, config, frames, video, prompt, response, patches, usable)
                 for stage, config in (("reflect scoring", stages.reflect), ("evaluate scoring", stages.evaluate))]
        s, e = stages.sample, stages.evaluate
        for stage, tp, max_len, seqs, needed in (
                ("sample (vLLM)", s.tensor_parallel_size, s.max_model_len, s.max_num_seqs, prompt + 2 * response),
                ("evaluate answers (vLLM)", 1, e.max_model_len, 16, prompt + e.max_new_tokens)):
            rows.append(_vllm_row(spec, stage, frames, video, needed, tp, max_len, seqs, patches, gpu_memory_gib))
    params = param_counts(spec)
    counts_by_part = {"vision": params.vision, "projector": params.projector, "language": params.language,
                      "lm_head": params.lm_head, "total": params.total,
                      "trainable": int(trainer.memory(counts[0])["trainable"])}
    return Plan(spec.name, spec.family, gpus, gpu_memory_gib, round(usable / GIB, 2), size, counts_by_part, rows)


def _train_rows(trainer: _Trainer, frames: int, usable: float) -> list[Row]:
    """The lean step (with advice when it does not fit or max_length cuts it) and the naive step."""
    video, _, length, scored = trainer.tokens(frames)
    prompt, max_length = trainer.prompt(frames), trainer.stages.train.max_length
    lean = trainer.memory(frames)
    notes = [] if lean["peak"] <= usable else [trainer.advice(frames, usable)]
    if prompt >= max_length:
        shorter = next((f for f in range(frames - 1, 0, -1) if trainer.prompt(f) < max_length), None)
        notes.insert(0, f"the prompt alone has {prompt} tokens: raise max_length to >= {prompt + trainer.response}"
                     + (f" or reduce num_frames to {shorter}" if shorter else ""))
    elif scored < trainer.response:
        notes.insert(0, f"responses cut to {scored} tokens by max_length")
    if trainer.spec.max_positions and length > trainer.spec.max_positions:
        notes.append(f"beyond the model's {trainer.spec.max_positions} positions")
    naive = trainer.memory(frames, lean=False)
    return [Row(stage, frames, video, length, trainer.setting(), round(mem["peak"] / GIB, 2), _gib(mem),
                mem["peak"] <= usable and prompt < max_length, note, mem["peak_phase"])
            for stage, mem, note in (("train (lean step)", lean, "; ".join(notes)),
                                     ("train (naive step)", naive, ""))]


def _scoring_row(spec: ModelSpec, stage: str, config, frames: int, video: int, prompt: int, response: int,
                 patches: int, usable: float) -> Row:
    """A likelihood-scoring stage (reflect, evaluate) at its batch_size, or the largest batch_size that fits."""
    bf16 = _scoring_bf16(config)

    def peak(batch: int, half: bool = bf16) -> float:
        return scoring_memory(spec, batch, prompt + response, response, patches, half)["peak"]

    mem = scoring_memory(spec, config.batch_size, prompt + response, response, patches, bf16)
    fit = mem["peak"] <= usable
    smaller = None if fit else next((b for b in range(config.batch_size - 1, 0, -1) if peak(b) <= usable), None)
    notes = [] if fit else [f"reduce batch_size to {smaller}" if smaller else "does not fit at batch_size 1"]
    if not fit and not bf16 and peak(config.batch_size, True) <= usable:
        notes.append(f"bf16 weights would fit ({peak(config.batch_size, True) / GIB:.1f} GiB)")
    note = "; ".join(notes)
    return Row(stage, frames, video, prompt + response, f"{'bf16' if bf16 else 'fp32'} weights, batch "
               f"{config.batch_size}", round(mem["peak"] / GIB, 2), _gib(mem), fit, note)


def _vllm_row(spec: ModelSpec, stage: str, frames: int, video: int, needed: int, tp: int, max_len: int, seqs: int,
              patches: int, gpu_memory_gib: float) -> Row:
    """A vLLM stage: weights + profiling forward + KV cache of one max_model_len sequence within its budget."""
    budget = VLLM_GPU_MEMORY_UTILIZATION * gpu_memory_gib * GIB
    mem = vllm_memory(spec, tp, max_len, seqs, patches)
    notes = [] if needed <= max_len else [f"max_model_len {max_len} < {needed} tokens (video, prompt, reply"
                                          f"{' and reflection reply' if stage.startswith('sample') else ''}): "
                                          f"raise max_model_len to >= {needed}"]
    fit = mem["peak"] <= budget
    if fit and not notes:
        room = (budget - mem["peak"] + mem["kv_per_token"] * max_len) // (mem["kv_per_token"] * max_len)
        notes.append(f"KV cache holds {int(room)} sequences of max_model_len at once")
    elif not fit:
        wider = next((t for t in (2, 4, 8)
                      if t > tp and vllm_memory(spec, t, max_len, seqs, patches)["peak"] <= budget), None)
        notes.append(f"needs tensor_parallel_size: {wider}" if wider else "does not fit with tensor parallelism <= 8")
    return Row(stage, frames, video, needed, f"bf16, TP {tp}, max_model_len {max_len}, gpu_memory_utilization "
               f"{VLLM_GPU_MEMORY_UTILIZATION}", round(mem["peak"] / GIB, 2), _gib(mem), fit and needed <= max_len,
               "; ".join(notes))


# ---------------------------------------------------------------- output and CLI


def render(result: Plan, width: int | None = None) -> str:
    """The plan as text: the model's parameters, each stage's setting, then one table row per stage and frame count."""
    import io as _io

    from rich import box
    from rich.console import Console
    from rich.table import Table

    m = {k: f"{v / 1e6:,.1f}M" for k, v in result.params.items()}
    head = m["lm_head"] if result.params["lm_head"] else "tied"
    lines = [f"{result.model} ({result.family}): {m['total']} parameters = vision {m['vision']} + projector "
             f"{m['projector']} + language model {m['language']} + LM head {head}; trainable {m['trainable']}",
             f"{result.gpus} GPU(s) x {result.gpu_memory_gib:g} GiB (a torch process may allocate "
             f"{result.usable_gib:g} GiB); frames reach the processor as {result.frame_size[0]}x"
             f"{result.frame_size[1]}"]
    lines += [f"  {stage}: {setting}" for stage, setting in dict((r.stage, r.setting) for r in result.rows).items()]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("stage", "frames", "video tokens", "tokens/seq", "peak GiB/GPU", "fits", "advice"):
        table.add_column(name, overflow="fold")
    order = list(dict.fromkeys(r.stage for r in result.rows))
    for r in sorted(result.rows, key=lambda r: (order.index(r.stage), r.frames)):
        table.add_row(r.stage, str(r.frames), str(r.video_tokens), str(r.tokens), f"{r.peak_gib:.1f}",
                      "yes" if r.fits else "NO", r.advice)
    console = Console(file=_io.StringIO(), width=width or 120, record=True, color_system=None)
    console.print("\n".join(lines), highlight=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


def _frame_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> Plan:
    """CLI: print the plan (or its JSON); exit 2 on a bad model or config."""
    parser = argparse.ArgumentParser(prog="leanpo plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=f"model folder, its config.json, or one of {sorted(PUBLISHED)}")
    parser.add_argument("--config", help="YAML/JSON with sections train/frames/sample/reflect/evaluate (a `leanpo "
                        "run` config; other keys are ignored)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs training runs on (default 1)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU (default 80)")
    parser.add_argument("--frames", help="comma-separated frame counts (default: the frames config's)")
    parser.add_argument("--frame-size", type=_frame_size, metavar="WxH", help="source frame size before "
                        "frames.max_side (default: square max_side frames, the most tokens a max_side allows)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens around the video (default 64)")
    parser.add_argument("--response-tokens", type=int, help="tokens per response (default: sample.max_new_tokens+1)")
    parser.add_argument("--zero", choices=["none", "0", "1", "2", "3"], help="ZeRO stage instead of train.deepspeed")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    try:
        spec = read_model(args.model)
        stages = read_stages(args.config, args.model)
        counts = [int(x) for x in args.frames.split(",")] if args.frames else None
    except (ConfigError, ValueError) as exc:
        print(f"leanpo plan: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    zero: Any = "config" if args.zero is None else (None if args.zero == "none" else int(args.zero))
    result = plan(spec, stages, args.gpus, args.gpu_memory_gib, counts, args.frame_size, args.prompt_tokens,
                  args.response_tokens, zero)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(render(result, shutil.get_terminal_size().columns if sys.stdout.isatty() else None), end="")
    return result


if __name__ == "__main__":
    main()
