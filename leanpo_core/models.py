"""Model-family adapters: the one place that knows how Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT-Video, LLaVA-OneVision differ.

Every other module asks `adapter_for(model)` and then calls the same four things: `build_prompt` (chat prompt with
the family's video placeholder), `encode` (model inputs plus response-only labels), `vllm_video_input` and
`engine_kwargs` (what vLLM needs for the video). Nothing else branches on the model type (STYLE rule 7).

The trainer reads hidden states and the output projection through `backbone_hidden_states` and `output_projection`:
in transformers 5 all four families expose `model.model(...)` (vision tower + language model, returns
`last_hidden_state`) and `model.get_output_embeddings()` (the LM head), so one code path serves them all.
For preference pairs, `adapter.shared_video_hidden_states` runs the vision tower once for sequences that show the
same video: the family's `get_video_features` (its arguments are the adapter's `video_feature_inputs`) feeds
`model.model(..., mm_encoder_outputs=...)`, which scatters the features and builds positions as a plain forward does.
`collate` right-pads single-sequence `encode` outputs into a batch.
`load_model` also applies `adapter.prepare_model`, which makes HF score tokens with the same positions as vLLM
(Qwen: transformers 5.19's video rope index differs from the reference code and vLLM; see `mrope_positions`).

    model, processor, adapter = load_model("/tmp/toy-qwen2vl")          # or a hub id where a hub is reachable
    prompt = adapter.build_prompt(processor, "What moves?")
    batch = adapter.encode(processor, frames, prompt, " A red square moves left.", meta=video_metadata(frames, 4.0))
    loss = model(**batch).loss
"""

from __future__ import annotations

import dataclasses
import itertools
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanpo_core.logps import IGNORE_INDEX

# Keys `model.model(...)` does not take; every other key `encode` returns is a model input.
_NOT_BACKBONE_INPUTS = ("labels",)
# Per-token processor outputs and their value on response positions (None: the response ids themselves);
# mm_token_type_ids marks vision tokens for Qwen's 3-D rope index, text is 0.
_PER_TOKEN_FILL = {"input_ids": None, "attention_mask": 1, "mm_token_type_ids": 0, "token_type_ids": 0}
# Padding value of each per-token input in a batch (None: the tokenizer's pad id).
_PAD = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0, "token_type_ids": 0}
# Per-video inputs other than the pixels (Qwen: one grid row and one temporal step per video).
_PER_VIDEO = ("video_grid_thw", "second_per_grid_ts")
VIDEO_PIXELS = "pixel_values_videos"


def ended_by_itself(finish_reason: str | None) -> bool:
    """Whether a reply ended on its own end-of-reply token, so that token is scored and trained with it.

    A reply cut at the generation limit (finish reason "length") never produced it: every stage (the reflect
    stage's likelihood, training, the evaluation's pair scoring) then scores the reply without it, never one each.
    A ground-truth reply (finish reason unknown, None) counts as ended.
    """
    return finish_reason != "length"


@dataclasses.dataclass(frozen=True)
class FamilyAdapter:
    """What differs between model families: prompt placeholder, end-of-reply token, processor and vLLM arguments."""

    name: str
    model_types: tuple[str, ...]
    video_placeholder: str  # text the chat template puts where the video goes (the processor expands it)
    end_of_reply: str  # token the template closes an assistant reply with; generation stops on it
    video_metadata_to_hf: bool  # the HF processor needs the sampled fps (Qwen2.5-VL: temporal position ids)
    model_fix: Callable[[Any], None] | None = None  # applied to a loaded HF model by `prepare_model`
    # vLLM 0.32's LLaVA-OneVision returns video embeddings as (1, tokens, hidden) tensors, which its encoder-output
    # check rejects when one encoder batch mixes frame counts (16 clean frames and a 2-frame lean view); batches of
    # one frame count pass, so the engine splits requests by frame count for such families.
    vllm_one_frame_count_per_batch: bool = False
    # The inputs `model.model.get_video_features` takes besides the pixels (Qwen: the patch grid of each video).
    video_feature_inputs: tuple[str, ...] = ()
    # Qwen's 3-D M-RoPE: positions come from the backbone's rope index (`prepare_model` makes it vLLM's), not 0..L-1.
    mrope: bool = False

    def prepare_model(self, model):
        """Make a loaded HF model score tokens exactly as vLLM (and the family's reference code) does; idempotent.

        `load_model` calls it; call it yourself on a model loaded any other way, before wrapping (PEFT, DeepSpeed).
        """
        if self.model_fix is not None:
            self.model_fix(model)
        return model

    def build_prompt(self, processor_or_tokenizer, text: str, system: str | None = None) -> str:
        """The chat prompt up to the assistant's generation prefix: one user turn, the video, then `text`.

        Uses the checkpoint's own chat template, so real checkpoints and the toy models render alike.
        """
        messages = [] if system is None else [{"role": "system", "content": [{"type": "text", "text": system}]}]
        messages.append({"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]})
        prompt = processor_or_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if prompt.count(self.video_placeholder) != 1:
            raise ValueError(f"{self.name}: the chat template must render the video placeholder "
                             f"{self.video_placeholder!r} exactly once, got {prompt!r}")
        return prompt

    def encode(self, processor, frames: np.ndarray, prompt: str, response: str | None = None,
               meta: Mapping[str, Any] | None = None, add_end: bool = True) -> dict[str, torch.Tensor]:
        """Model inputs for one (video, prompt[, response]); batch size 1.

        frames: (T, H, W, 3) uint8. meta: `video_metadata(...)` of those frames (fps of the source etc.; only
        Qwen2.5-VL's processor reads it, defaults to 1 fps with frames 0..T-1). The prompt is processed with the video
        (its placeholder expands to the video tokens) and the response is tokenised on its own, without special
        tokens, then appended: BPE would otherwise merge tokens across the boundary and shift the mask. `add_end`
        appends the family's end-of-reply token, which generation ends on and so is scored too (leave it off for a
        response cut at max_tokens).

        Returns input_ids, attention_mask: (1, L) with L = prompt tokens P + response tokens R; the family's
        vision inputs (Qwen: pixel_values_videos (patches, C*t*p*p), video_grid_thw (1, 3)[, second_per_grid_ts (1,)];
        LLaVA: pixel_values_videos (1, T, 3, h, w)); with a response also labels: (1, L), IGNORE_INDEX (-100) on the
        P prompt/video positions and the response ids on the last R.
        """
        meta = dict(meta) if meta is not None else video_metadata(frames)
        kwargs: dict[str, Any] = {"do_sample_frames": False}
        if self.video_metadata_to_hf:
            kwargs["video_metadata"] = [{k: v for k, v in meta.items() if k != "do_sample_frames"}]
        inputs = dict(processor(text=[prompt], videos=[frames], return_tensors="pt", **kwargs))
        if response is None:
            return inputs
        tokenizer = getattr(processor, "tokenizer", processor)
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if add_end:
            ids = ids + [tokenizer.convert_tokens_to_ids(self.end_of_reply)]
        response_ids = torch.tensor([ids], dtype=inputs["input_ids"].dtype)
        prompt_len = inputs["input_ids"].shape[1]
        for key, fill_value in _PER_TOKEN_FILL.items():  # per-token tensors grow by the R response positions
            if key in inputs:
                fill = response_ids if fill_value is None else torch.full_like(response_ids, fill_value)
                inputs[key] = torch.cat([inputs[key], fill.to(inputs[key].dtype)], dim=1)
        inputs["labels"] = torch.cat([torch.full((1, prompt_len), IGNORE_INDEX, dtype=response_ids.dtype),
                                      response_ids], dim=1)
        return inputs

    def video_features(self, model, inputs: Mapping[str, Any]):
        """The vision tower + projector output for the videos of `inputs` (what `model.model` would compute)."""
        kwargs = {k: inputs[k] for k in self.video_feature_inputs}
        return unwrap(model).model.get_video_features(inputs[VIDEO_PIXELS], return_dict=True, **kwargs)

    def text_positions(self, model, inputs: Mapping[str, Any]) -> torch.Tensor:
        """The position ids a plain forward gives right-padded `inputs`: (3, B, L) M-RoPE positions for Qwen, else
        (B, L) = 0..n-1 over each row's real tokens (what `model.model(...)` builds when given none)."""
        mask = inputs["attention_mask"]
        if self.mrope:
            return unwrap(model).model.get_rope_index(
                inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs.get("video_grid_thw"),
                second_per_grid_ts=inputs.get("second_per_grid_ts"), attention_mask=mask)[0]
        return flat_positions(mask)

    def select_videos(self, inputs: Mapping[str, Any], indices: list[int]) -> dict[str, torch.Tensor]:
        """The vision inputs of videos `indices` of a batch (Qwen: each video's patch rows, counted by its grid)."""
        pixels = inputs[VIDEO_PIXELS]
        if "video_grid_thw" in inputs:
            ends = inputs["video_grid_thw"].prod(-1).cumsum(0).tolist()
            starts = [0] + ends[:-1]
            selected = {VIDEO_PIXELS: torch.cat([pixels[starts[i]:ends[i]] for i in indices])}
        else:
            selected = {VIDEO_PIXELS: pixels[indices]}
        selected.update({k: inputs[k][indices] for k in _PER_VIDEO if k in inputs})
        return selected

    def pixel_shapes(self, inputs: Mapping[str, Any]) -> list[tuple[int, ...]]:
        """Per video of a batch, the shape of what the tower sees (Qwen: its patch grid; LLaVA: frames, channels,
        height, width): with the frames, it fixes the tower's output."""
        if "video_grid_thw" in inputs:
            return [tuple(row) for row in inputs["video_grid_thw"].tolist()]
        return [tuple(video.shape) for video in inputs[VIDEO_PIXELS]]

    def shared_video_hidden_states(self, model, batch: Mapping[str, Any], copies: int, features=None,
                                   **overrides: Any) -> torch.Tensor:
        """Last hidden states (copies*B, L, hidden) of sequences that reuse B videos, the vision tower run once.

        batch: per-token tensors of copies*B rows (row c*B + b shows video b; e.g. B chosen then B rejected) and the
        vision inputs of the B videos only. The video features are computed once and handed to the backbone as
        precomputed encoder outputs (transformers 5's `mm_encoder_outputs`), so the model itself scatters them at
        the placeholders and builds its positions (Qwen: the 3-D rope index of `prepare_model`), as in `model(...)`.
        `features`: the vision output when already computed (`features.cached_video_features`); `overrides`
        replace backbone inputs (`prefix.pair_logps` passes a 4-D attention_mask, position_ids and the joined rows'
        lengths for its attention).
        """
        features = features if features is not None else self.video_features(model, batch)
        pooled = features.pooler_output  # Qwen, LLaVA-NeXT-Video: one tensor per video; OneVision: (B, tokens, H)
        features.pooler_output = (tuple(pooled) * copies if isinstance(pooled, (tuple, list))
                                  else torch.cat([pooled] * copies, dim=0))
        kwargs = {k: v for k, v in batch.items() if k in _PER_TOKEN_FILL}
        kwargs.update(repeat_videos({k: batch[k] for k in _PER_VIDEO if k in batch}, copies))
        kwargs.update(overrides)
        return unwrap(model).model(**kwargs, mm_encoder_outputs={"video": features}).last_hidden_state

    def vllm_video_input(self, frames: np.ndarray, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The `multi_modal_data` of a vLLM prompt: {"video": (frames (T, H, W, 3) uint8, metadata)}.

        The metadata says the frames are already sampled (do_sample_frames False), so vLLM uses them as given,
        exactly like `encode`; Qwen2.5-VL requires it, the other families accept it.
        """
        meta = dict(meta) if meta is not None else video_metadata(frames)
        meta["do_sample_frames"] = False
        return {"video": (np.ascontiguousarray(frames), meta)}

    def engine_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for `vllm.LLM(...)`: one video per prompt and no images (so vLLM reserves no image
        budget), then `overrides`. None of the four families needs more on vLLM 0.32 (no mm_processor_kwargs)."""
        return {"limit_mm_per_prompt": {"video": 1, "image": 0}, **overrides}


def flat_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions 0..n-1 over each right-padded row's real tokens (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def mrope_positions(mm_token_type_ids: torch.Tensor, grids: Mapping[int, list[list[int]]], spatial_merge_size: int,
                    video_steps: list[float] | None = None) -> torch.Tensor:
    """Qwen2-VL/Qwen2.5-VL 3-D rope positions (3, L) of one unpadded sequence, as reference code and vLLM build them.

    mm_token_type_ids: (L,) 0 text, 1 image, 2 video, one run of 1s/2s per image/video; grids: {1: image
    grid_thw rows, 2: video grid_thw rows} in order; video_steps: temporal position step per video (Qwen2.5-VL:
    tokens_per_second * second_per_grid_t; Qwen2-VL: 1). A vision run at offset s gets (t*step + s, h + s, w + s)
    over its merged (t, h, w) grid; text counts on from the largest position used so far + 1. (transformers 5.19
    instead restarts text at s + max(h, w) after a vision run, ignoring the temporal extent: it then disagrees with
    vLLM whenever a video has more temporal than spatial positions.)
    """
    grid_iters = {kind: iter(rows) for kind, rows in grids.items()}
    steps = iter(video_steps or [])
    chunks, start = [], 0
    for kind, run in itertools.groupby(mm_token_type_ids.tolist()):
        length = len(list(run))
        if kind == 0:
            chunk = torch.arange(length).expand(3, length) + start
        else:
            t, h, w = next(grid_iters[kind])
            step = next(steps, 1.0) if kind == 2 else 1.0
            grid = torch.meshgrid((torch.arange(t) * step).long(), torch.arange(h // spatial_merge_size),
                                  torch.arange(w // spatial_merge_size), indexing="ij")
            chunk = torch.stack(grid).reshape(3, -1) + start
            if chunk.shape[1] != length:
                raise ValueError(f"vision run of {length} tokens does not match grid {(t, h, w)}")
        chunks.append(chunk)
        start = int(chunk.max()) + 1
    return torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)


def _reference_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                          second_per_grid_ts=None, attention_mask=None, **_):
    """Drop-in for Qwen2(.5)-VL's `model.model.get_rope_index`: (positions (3, B, L), rope deltas (B, 1))."""
    vision = self.config.vision_config
    tokens_per_second = getattr(vision, "tokens_per_second", None)  # Qwen2.5-VL only
    rows = {1: [] if image_grid_thw is None else image_grid_thw.tolist(),
            2: [] if video_grid_thw is None else video_grid_thw.tolist()}
    steps = None
    if tokens_per_second is not None and second_per_grid_ts is not None:
        steps = [tokens_per_second * float(s) for s in torch.as_tensor(second_per_grid_ts).flatten().tolist()]
    positions = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
    deltas, used = [], {1: 0, 2: 0}
    for b in range(input_ids.shape[0]):
        keep = torch.ones_like(input_ids[b], dtype=torch.bool) if attention_mask is None else attention_mask[b].bool()
        types_b = mm_token_type_ids[b][keep].cpu()
        runs = {k: sum(1 for key, _ in itertools.groupby(types_b.tolist()) if key == k) for k in (1, 2)}
        grids = {k: rows[k][used[k]:used[k] + runs[k]] for k in (1, 2)}
        step_b = None if steps is None else steps[used[2]:used[2] + runs[2]]
        used = {k: used[k] + runs[k] for k in (1, 2)}
        pos = mrope_positions(types_b, grids, vision.spatial_merge_size, step_b)
        positions[:, b, keep] = pos.to(positions.device, positions.dtype)
        deltas.append(int(pos.max()) + 1 - pos.shape[1])
    return positions, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def _use_reference_rope_index(model) -> None:
    """Swap the instance's `get_rope_index` for the reference one, so HF training and vLLM sampling see the same
    positions (without it, per-token log-probs differ by up to ~2e-3 on short-frame videos)."""
    backbone = model.model
    backbone.get_rope_index = types.MethodType(_reference_rope_index, backbone)


QWEN2_VL = FamilyAdapter("qwen2_vl", ("qwen2_vl",), "<|vision_start|><|video_pad|><|vision_end|>", "<|im_end|>",
                         video_metadata_to_hf=False, model_fix=_use_reference_rope_index,
                         video_feature_inputs=("video_grid_thw",), mrope=True)
QWEN2_5_VL = FamilyAdapter("qwen2_5_vl", ("qwen2_5_vl",), "<|vision_start|><|video_pad|><|vision_end|>",
                           "<|im_end|>", video_metadata_to_hf=True, model_fix=_use_reference_rope_index,
                           video_feature_inputs=("video_grid_thw",), mrope=True)
LLAVA_NEXT_VIDEO = FamilyAdapter("llava_next_video", ("llava_next_video",), "<video>", "</s>",
                                 video_metadata_to_hf=False)
LLAVA_ONEVISION = FamilyAdapter("llava_onevision", ("llava_onevision",), "<video>", "<|im_end|>",
                                video_metadata_to_hf=False, vllm_one_frame_count_per_batch=True)
ADAPTERS: dict[str, FamilyAdapter] = {a.name: a for a in (QWEN2_VL, QWEN2_5_VL, LLAVA_NEXT_VIDEO, LLAVA_ONEVISION)}
_BY_MODEL_TYPE = {t: a for a in ADAPTERS.values() for t in a.model_types}


def video_metadata(frames: np.ndarray, fps: float = 1.0, frames_indices: list[int] | None = None,
                   total_num_frames: int | None = None, video_backend: str = "decord") -> dict[str, Any]:
    """Metadata of T sampled frames (T, H, W, 3): `fps` and `total_num_frames` of the SOURCE video, and which
    source frames were taken (default: all of them, 0..T-1). Its sampled fps, len(indices) / total * fps, sets
    Qwen2.5-VL's temporal positions, so HF (`encode`) and vLLM (`vllm_video_input`) must get the same dict.
    """
    num, height, width = int(frames.shape[0]), int(frames.shape[1]), int(frames.shape[2])
    indices = list(range(num)) if frames_indices is None else [int(i) for i in frames_indices]
    total = num if total_num_frames is None else int(total_num_frames)
    return {"fps": float(fps), "total_num_frames": total, "frames_indices": indices, "duration": total / float(fps),
            "width": width, "height": height, "video_backend": video_backend, "do_sample_frames": False}


def adapter_for(model_path_or_config) -> FamilyAdapter:
    """The adapter of a model folder, hub id, config or model (dispatch on `config.model_type`)."""
    config = getattr(model_path_or_config, "config", model_path_or_config)
    if isinstance(config, (str, Path)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(config))
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(_BY_MODEL_TYPE)}")
    return _BY_MODEL_TYPE[model_type]


def load_model(path_or_hub_id: str | Path, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device | None = "cpu", **from_pretrained_kwargs: Any):
    """(model, processor, adapter) for a local folder or hub id: `AutoModelForImageTextToText` + `AutoProcessor`.

    The weights load straight onto `device` (device_map); pass device=None where a launcher places them (ZeRO-3).
    Extra keyword arguments go to `from_pretrained` (e.g. attn_implementation, revision).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source = str(path_or_hub_id)
    if device is not None:
        from_pretrained_kwargs.setdefault("device_map", str(device))
    from_pretrained_kwargs.pop("use_safetensors", None)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, use_safetensors=True,  # no pickles
                                                        **from_pretrained_kwargs)
    processor = AutoProcessor.from_pretrained(source)
    adapter = adapter_for(model)
    return adapter.prepare_model(model), processor, adapter


def unwrap(model):
    """The Hugging Face model inside a PEFT wrapper (LoRA layers stay in place), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def vision_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of everything but the language model and the LM head: the vision tower, the projector (and
    LLaVA's image_newline), what `freeze_vision` freezes and what a video's features depend on."""
    hf = unwrap(model)
    language = {id(p) for p in hf.model.language_model.parameters()}
    language |= {id(p) for p in hf.get_output_embeddings().parameters()}
    return [(name, p) for name, p in hf.named_parameters() if id(p) not in language]


def is_per_token(key: str) -> bool:
    """Whether an `encode` output is per token (padded in batches) rather than per video."""
    return key in _PAD


class ProcessOnce:
    """A processor for several encodings of one prompt on one clip (a pair's two sides; a question's candidates):
    the first call runs the wrapped processor (tokens and the video's pixels), a later call with the same prompt and
    the same frames object returns those outputs again. `encode` copies every per-token tensor it extends, so the
    shared outputs are never modified."""

    def __init__(self, processor):
        self._processor, self._key, self._outputs = processor, None, None

    def __call__(self, *, text, videos, **kwargs):
        key = (list(text), [id(v) for v in videos], repr(sorted(kwargs.items())))
        if key != self._key:
            self._key, self._outputs = key, self._processor(text=text, videos=videos, **kwargs)
        return self._outputs

    def __getattr__(self, name):
        return getattr(self._processor, name)


def padding_value(key: str, pad_id: int = 0) -> int:
    """What right-pads per-token input `key` (input_ids: `pad_id`; labels: IGNORE_INDEX; masks and types: 0).
    `collate` spells the same rule inline: its source is part of the toy world's content key
    (`toyworld.WorldSettings.key`), so editing it would make every clone rebuild the shipped toy world."""
    return pad_id if _PAD[key] is None else _PAD[key]


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-pad per-token tensors of single-sequence `encode` outputs to one batch; stack the vision tensors.

    Right padding leaves every real token's position unchanged (Qwen's rope index skips masked positions, LLaVA
    counts from 0), so each row scores as it would alone. Items must share a frame shape (LLaVA stacks clips).
    Every tensor that is not per-token is per-video and concatenates along dim 0 (Qwen: patches and grid rows).
    """
    length = max(item["input_ids"].shape[1] for item in items)
    batch = {}
    for key in items[0]:
        tensors = [item[key] for item in items]
        if key in _PAD:
            fill = pad_id if _PAD[key] is None else _PAD[key]
            tensors = [torch.nn.functional.pad(t, (0, length - t.shape[1]), value=fill) for t in tensors]
        batch[key] = torch.cat(tensors, dim=0)
    return batch


def video_inputs(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The per-video model inputs of a batch: the pixels and, for Qwen, each video's grid (and temporal step)."""
    return {k: v for k, v in batch.items() if k == VIDEO_PIXELS or k in _PER_VIDEO}


def repeat_videos(video_inputs: Mapping[str, torch.Tensor], copies: int) -> dict[str, torch.Tensor]:
    """Per-video inputs of B videos repeated for copies*B sequences (video b again at rows B+b, 2B+b, ...)."""
    return {k: torch.cat([v] * copies, dim=0) for k, v in video_inputs.items()}


def backbone_hidden_states(model, inputs: Mapping[str, Any]) -> torch.Tensor:
    """Last hidden states (B, L, hidden) of the vision+language backbone, without the LM head (same for all four)."""
    kwargs = {k: v for k, v in inputs.items() if k not in _NOT_BACKBONE_INPUTS}
    return unwrap(model).model(**kwargs).last_hidden_state


def output_projection(model) -> torch.nn.Module:
    """The LM head mapping hidden states (..., hidden) to vocabulary logits (..., V) (same for all four)."""
    return unwrap(model).get_output_embeddings()
