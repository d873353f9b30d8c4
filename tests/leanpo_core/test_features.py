"""Frozen-vision feature cache: cached features give the recomputed log-probs (1e-6), the tower runs once per
video and process, and a cached training run ends where an uncached one does."""

from __future__ import annotations

import pytest
import torch

from leanpo_core import features, models, pairdata, train
from leanpo_core.config import TrainConfig

from .conftest import FAMILIES
from .test_train import _config, _count_videos, pair_data  # noqa: F401 (fixture)


def _item(processor, adapter, clip, meta, video_id, question, chosen, rejected):
    prompt = adapter.build_prompt(processor, question)
    return {"chosen": adapter.encode(processor, clip, prompt, chosen, meta=meta),
            "rejected": adapter.encode(processor, clip, prompt, rejected, meta=meta),
            "chosen_baseline": -2.0, "rejected_baseline": -3.0, features.VIDEO_IDS: video_id}


@pytest.mark.parametrize("sharing", [True, False], ids=["prefix-shared", "two-rows"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_features_equal_recomputed(family, sharing, loaded, video, monkeypatch):
    """Batch [A], then [B, A, B]: A comes from the cache, B is computed once; every result equals the uncached one."""
    model, processor, adapter = loaded(family)
    frames, meta = video
    clips = {}
    for name, part in (("A", slice(0, 4)), ("B", slice(4, 8))):
        clip = frames[part]
        clips[name] = (clip, models.video_metadata(clip, fps=meta["fps"], frames_indices=meta["frames_indices"][part],
                                                   total_num_frames=meta["total_num_frames"]))
    texts = {"A": ("What moves?", " a red square", " a circle"), "B": ("What colour?", " red", " green and slow")}
    collate = pairdata.PairCollator(processor.tokenizer.pad_token_id or 0, prefix_sharing=sharing)

    def batch(names):
        return collate([_item(processor, adapter, *clips[n], n, *texts[n]) for n in names])

    cache = features.FeatureCache(max_bytes=2**26)
    seen = _count_videos(model, monkeypatch)
    pixel_rows = {n: adapter.select_videos(batch([n]), [0])[models.VIDEO_PIXELS].shape[0] for n in "AB"}
    with torch.no_grad():
        for names, computed in (("A", ["A"]), ("BAB", ["B"]), ("BAB", [])):
            seen.clear()
            cached = train.pair_logps(model, adapter, batch(names), cache=cache)
            assert seen == ([pixel_rows[n] for n in computed] if computed else []), names
            fresh = train.pair_logps(model, adapter, batch(names))
            assert torch.equal(cached[1], fresh[1])
            torch.testing.assert_close(cached[0], fresh[0], atol=1e-6, rtol=0)
    assert len(cache) == 2 and (cache.misses, cache.hits) == (2, 3)


def test_cache_evicts_least_recently_used():
    cache = features.FeatureCache(max_bytes=3 * 16)
    for key in "abc":
        cache.put(key, torch.zeros(4))  # 16 bytes each
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", torch.zeros(4))
    assert cache.get("b") is None and cache.get("a") is not None and cache.bytes == 48
    cache.put("big", torch.zeros(100))  # larger than the whole cache: not kept
    assert cache.get("big") is None and len(cache) == 3


def test_training_with_the_cache_runs_the_tower_once_per_video(pair_data, toy_dirs, tmp_path, monkeypatch):
    """4 kept pairs of one video, 3 steps of 2 pairs: the tower runs once in the whole run; losses and exported
    weights as without the cache (1e-5 on step 1; 1e-4 later, Adam's amplified noise as between ZeRO stages)."""
    from leanpo_core import io, schemas

    caches, original = [], features.FeatureCache
    monkeypatch.setattr(features, "FeatureCache", lambda *a, **k: caches.append(original(*a, **k)) or caches[-1])
    runs = {}
    for mib in (64, 0):
        config = _config(toy_dirs["qwen2_vl"], vision_feature_cache_mib=mib)
        result = train.train(config, *pair_data, str(tmp_path / str(mib)))
        losses = io.read_table(result.metrics_uri, schemas.TRAIN_METRICS).column("loss").to_pylist()
        runs[mib] = (losses, models.load_model(result.model_dir)[0].state_dict())
    assert len(caches) == 1 and (caches[0].misses, caches[0].hits) == (1, 2)
    assert abs(runs[64][0][0] - runs[0][0][0]) < 1e-5
    assert runs[64][0] == pytest.approx(runs[0][0], rel=1e-4)
    for key, value in runs[0][1].items():
        torch.testing.assert_close(runs[64][1][key], value, atol=1e-4, rtol=0, msg=key)
    assert TrainConfig(model="x").vision_feature_cache_mib > 0  # on by default
