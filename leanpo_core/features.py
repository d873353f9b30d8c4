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

Persisted (`persist_vision_features` of the reflect, train and evaluate configs, off by default): a `FeatureStore`
behind the cache keeps each video's features as one safetensors object in `vision_features/` next to the frames
table (local or s3://), so the passes of a round that read a video with the same tower (reflect's likelihood pass,
training, evaluation's likelihood pass; each a process of its own) run the tower once between them, and a rerun
none. An object is named by what fixes the features: a hash of the tower and projector (their weights, dtypes and
config, the device type, torch and transformers versions: `tower_digest`) and a hash of the video's exact vision
input (its pixel values and grid). Any change of frames, pixel budget, processor or weights gives another name, so
nothing stale is ever read; objects of old keys stay until the folder is deleted. Hashing the tower takes one pass
over its weights per process (about 1.3 GB for a 7B Qwen2-VL in bf16: seconds).

    cache = FeatureCache(max_bytes=2 * 2**30)
    features = cached_video_features(adapter, model, batch, batch[VIDEO_IDS], cache)
    hidden = adapter.shared_video_hidden_states(model, batch, copies=2, features=features)
"""

from __future__ import annotations

import collections
import hashlib
import json
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from leanpo_core import io, models

# Batch key of the per-video ids (video key and frame indices) the cache is keyed by; not a model input.
VIDEO_IDS = "video_ids"


def store_uri(frames_uri: str) -> str:
    """Where the persisted features of the videos of the frames table at `frames_uri` live: `vision_features` beside
    it (`run/frames` -> `run/vision_features`, the same for s3:// URIs)."""
    folder, sep, _ = frames_uri.rstrip("/").rpartition("/")
    return f"{folder}{sep}vision_features"


def _update(digest, tensor: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes (on the CPU) to a hash."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(f"{flat.dtype}{tuple(tensor.shape)};".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def tower_digest(model) -> str:
    """A hash of everything a video's features depend on besides the video: the tower and projector's weights
    (names, dtypes, bytes), the vision config, the device type, torch and transformers versions."""
    import transformers

    hf = models.unwrap(model)
    vision_config = getattr(hf.config, "vision_config", None)
    parameters = models.vision_parameters(model)
    digest = hashlib.sha256(json.dumps({
        "model_type": hf.config.model_type, "vision": vision_config.to_dict() if vision_config else None,
        "device": parameters[0][1].device.type if parameters else "cpu", "torch": torch.__version__,
        "transformers": transformers.__version__}, sort_keys=True, default=str).encode())
    for name, p in sorted(parameters, key=lambda item: item[0]):
        digest.update(name.encode())
        _update(digest, p)
    return digest.hexdigest()


class FeatureStore:
    """Per-video features as safetensors objects under `uri` (a folder or s3:// prefix), named by the tower's digest
    and the hash of the video's vision input; writes are atomic (`io.write_bytes`), so ranks or passes writing the
    same video at once store the same bytes. Counts objects loaded and saved."""

    def __init__(self, uri: str, options: io.StorageOptions | None = None):
        self.uri, self.options, self.loaded, self.saved, self.damaged = uri, options, 0, 0, 0

    def name(self, tower: str, inputs: Mapping[str, torch.Tensor]) -> str:
        """The object of one video: `<tower digest[:16]>/<sha256 of its vision inputs>.safetensors`."""
        digest = hashlib.sha256(tower.encode())
        for key in sorted(inputs):
            digest.update(key.encode())
            _update(digest, inputs[key])
        return io.join_uri(self.uri, tower[:16], f"{digest.hexdigest()}.safetensors")

    def load(self, name: str) -> tuple[torch.Tensor, bool] | None:
        """(features, stacked) stored under `name`, or None when there is none or it cannot be read as features (a
        damaged object is then computed again and overwritten, never used)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            data = io.read_bytes(name, self.options)
        except FileNotFoundError:
            return None
        try:
            value, stacked = load(data)["features"], _metadata(data).get("stacked") == "1"
        except (SafetensorError, ValueError, KeyError):
            self.damaged += 1
            return None
        self.loaded += 1
        return value, stacked

    def save(self, name: str, value: torch.Tensor, stacked: bool) -> None:
        from safetensors.torch import save

        io.write_bytes(name, save({"features": value.detach().to("cpu").contiguous()},
                                  metadata={"stacked": "1" if stacked else "0"}), self.options)
        self.saved += 1


def _metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors payload (its 8-byte little-endian header length, then a JSON header)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__") or {}


class FeatureCache:
    """Per-video features on the CPU, least recently used evicted beyond `max_bytes`; counts hits and misses.
    With a `store`, a video missing here is looked up there before the tower runs, and computed features are saved
    to it."""

    def __init__(self, max_bytes: int, store: FeatureStore | None = None):
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self.store, self.computed = store, 0  # computed: videos that went through the tower
        self.stacked = False  # the family returns one (videos, tokens, hidden) tensor, not a tuple per video
        self._entries: collections.OrderedDict[Hashable, torch.Tensor] = collections.OrderedDict()
        self._towers: dict[int, str] = {}  # id(tower) -> tower_digest, computed once per tower

    def tower(self, model) -> str:
        key = id(models.unwrap(model).model)
        if key not in self._towers:
            self._towers[key] = tower_digest(model)
        return self._towers[key]

    def summary(self) -> str:
        """One line for the log: videos through the tower, reuses in memory, objects read from / written to the
        store."""
        line = f"vision features: {self.computed} video(s) through the tower, {self.hits} reuse(s) in memory"
        if self.store is not None:
            line += f", {self.store.loaded} read from and {self.store.saved} written to {self.store.uri}"
            if self.store.damaged:
                line += f" ({self.store.damaged} damaged object(s) there computed again)"
        return line

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


def new_cache(max_mib: int, persist: bool, frames_uri: str, options: io.StorageOptions | None = None,
              ) -> FeatureCache | None:
    """The cache a pass builds from its config: `max_mib` of CPU memory (0: none, and nothing persisted), backed by
    the store beside `frames_uri` when `persist`."""
    if not max_mib:
        return None
    return FeatureCache(max_mib * 2**20, FeatureStore(store_uri(frames_uri), options) if persist else None)


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
    names = {}
    if missing and cache.store is not None:
        for key in list(missing):
            names[key] = cache.store.name(cache.tower(model), adapter.select_videos(batch, [keys.index(key)]))
            stored = cache.store.load(names[key])
            if stored is not None:
                found[key], cache.stacked = stored
                cache.put(key, found[key])
                missing.remove(key)
    if missing:
        pooled = adapter.video_features(model, adapter.select_videos(batch, [keys.index(k) for k in missing]))
        cache.stacked = not isinstance(pooled.pooler_output, (tuple, list))
        cache.computed += len(missing)
        for key, value in zip(missing, _per_video(pooled.pooler_output, len(missing))):
            cache.put(key, value)
            found[key] = value
            if cache.store is not None:
                cache.store.save(names[key], value, cache.stacked)
    device = batch[models.VIDEO_PIXELS].device
    videos = [found[key].to(device, non_blocking=True) for key in keys]
    return BaseModelOutputWithPooling(pooler_output=torch.stack(videos) if cache.stacked else tuple(videos))
