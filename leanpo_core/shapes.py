"""The shape of a Video-LLM from its config.json alone (no weights, no torch model): parameters by part (vision
tower, projector, language model, LM head), LoRA parameters, and video tokens per frame count as the processors
count them. What `leanpo plan` (leanpo_core/plan.py) and the memory model (leanpo_core/memory.py) read.
PUBLISHED holds the shapes of five published models, for planning without their files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from leanpo_core.config import ConfigError

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
