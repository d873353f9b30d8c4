"""Frozen-vision feature cache: a video's vision-tower (+ projector) output computed once per process, then reused.

With the tower frozen (`TrainConfig.freeze_vision`, the default), the features of a video depend only on the tower's
weights and the pixels it is shown, so the second and later epochs need not run it at all. Entries are keyed by
(the tower module, the video's key and frame indices, the shape of its pixel input: the pixel budget), kept on the
CPU (a GPU's memory goes to the step), least recently used first out past `max_bytes`, and moved to the step's
device when used. Sizes per video: tokens x hidden x bytes, e.g. Qwen2-VL-7B at 32 frames of 448x448 is 16 x 256
tokens x 3584 x 2 bytes (bf16) = 29 MiB, so a 2 GiB cache holds ~70 such videos; the toy models' are a few KiB.

The cache lives in one process and serves one model (training's, each rank its own; the reflect and evaluate
stages' likelihood passes, one per loaded model: `reflect.sft_scores`). A tower that trains must not use it: the
trainer builds none unless `freeze_vision` holds, nor under ZeRO-3, where running the tower is a collective (its
partitioned weights are gathered from every rank) and ranks whose caches differ would wait on each other forever.

    cache = FeatureCache(max_bytes=2 * 2**30)
    features = cached_video_features(adapter, model, batch, batch[VIDEO_IDS], cache)
    hidden = adapter.shared_video_hidden_states(model, batch, copies=2, features=features)
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from leanpo_core import models

# Batch key of the per-video ids (video key and frame indices) the cache is keyed by; not a model input.
VIDEO_IDS = "video_ids"


class FeatureCache:
    """Per-video features on the CPU, least recently used evicted beyond `max_bytes`; counts hits and misses."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self.stacked = False  # the family returns one (videos, tokens, hidden) tensor, not a tuple per video
        self._entries: collections.OrderedDict[Hashable, torch.Tensor] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> torch.Tensor | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        if key in self._entries:
            old = self._entries.pop(key)
            self.bytes -= old.numel() * old.element_size()
        self._entries[key] = value.detach().to("cpu", copy=True)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


def _per_video(pooled: Any, count: int) -> list[torch.Tensor]:
    """The vision output of `count` videos split per video (Qwen, LLaVA-NeXT-Video: a tuple; OneVision: a
    (videos, tokens, hidden) tensor)."""
    videos = list(pooled) if isinstance(pooled, (tuple, list)) else list(pooled.unbind(0))
    if len(videos) != count:
        raise ValueError(f"vision output of {len(videos)} videos for {count} inputs")
    return videos


def cached_video_features(adapter: models.FamilyAdapter, model, batch: Mapping[str, Any], video_ids: Sequence[str],
                          cache: FeatureCache) -> BaseModelOutputWithPooling:
    """The vision output of the batch's videos, in the form the backbone takes as `mm_encoder_outputs["video"]`,
    running the tower only on the videos whose features are not cached. video_ids: one per video of the batch."""
    tower = id(models.unwrap(model).model)
    keys = [(tower, video_id, shape) for video_id, shape in zip(video_ids, adapter.pixel_shapes(batch), strict=True)]
    found = {key: cache.get(key) for key in dict.fromkeys(keys)}  # a video twice in a batch is looked up once
    missing = [key for key, value in found.items() if value is None]
    if missing:
        pooled = adapter.video_features(model, adapter.select_videos(batch, [keys.index(k) for k in missing]))
        cache.stacked = not isinstance(pooled.pooler_output, (tuple, list))
        for key, value in zip(missing, _per_video(pooled.pooler_output, len(missing))):
            cache.put(key, value)
            found[key] = value
    device = batch[models.VIDEO_PIXELS].device
    videos = [found[key].to(device, non_blocking=True) for key in keys]
    return BaseModelOutputWithPooling(pooler_output=torch.stack(videos) if cache.stacked else tuple(videos))
