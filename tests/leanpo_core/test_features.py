"""Frozen-vision feature cache: cached features give the recomputed log-probs (1e-6), the tower runs once per
video and process, and a cached training run ends where an uncached one does; persisted features (a store beside the
frames table, local or S3) serve the next process without the tower and are never served to another tower."""

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


def _batches(processor, adapter, video, sharing: bool):
    """A function of names ("BAB") to a collated batch of pairs on clip A (frames 0-3) or B (frames 4-7)."""
    frames, meta = video
    clips = {}
    for name, part in (("A", slice(0, 4)), ("B", slice(4, 8))):
        clip = frames[part]
        clips[name] = (clip, models.video_metadata(clip, fps=meta["fps"], frames_indices=meta["frames_indices"][part],
                                                   total_num_frames=meta["total_num_frames"]))
    texts = {"A": ("What moves?", " a red square", " a circle"), "B": ("What colour?", " red", " green and slow")}
    collate = pairdata.PairCollator(processor.tokenizer.pad_token_id or 0, prefix_sharing=sharing)
    return lambda names: collate([_item(processor, adapter, *clips[n], n, *texts[n]) for n in names])


def _same_logps(model, adapter, batch, cache) -> None:
    cached = train.pair_logps(model, adapter, batch, cache=cache)
    fresh = train.pair_logps(model, adapter, batch)
    assert torch.equal(cached[1], fresh[1])
    torch.testing.assert_close(cached[0], fresh[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("sharing", [True, False], ids=["prefix-shared", "two-rows"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_features_equal_recomputed(family, sharing, loaded, video, monkeypatch):
    """Batch [A], then [B, A, B]: A comes from the cache, B is computed once; every result equals the uncached one."""
    model, processor, adapter = loaded(family)
    batch = _batches(processor, adapter, video, sharing)
    cache = features.FeatureCache(max_bytes=2**26)
    seen = _count_videos(model, monkeypatch)
    pixel_rows = {n: adapter.select_videos(batch([n]), [0])[models.VIDEO_PIXELS].shape[0] for n in "AB"}
    with torch.no_grad():
        for names, computed in (("A", ["A"]), ("BAB", ["B"]), ("BAB", [])):
            seen.clear()
            train.pair_logps(model, adapter, batch(names), cache=cache)
            assert seen == ([pixel_rows[n] for n in computed] if computed else []), names
            _same_logps(model, adapter, batch(names), cache)
    assert len(cache) == 2 and (cache.misses, cache.hits) == (2, 3 + 5)  # + the comparisons' look-ups


@pytest.mark.parametrize("family", FAMILIES)
def test_persisted_features_serve_the_next_process(family, loaded, video, tmp_path, monkeypatch):
    """A store-backed cache computes A and B and saves them; a new cache on the same store (what the next pass, in a
    process of its own, builds) runs no tower and gives the recomputed log-probs (1e-6). A changed tower weight
    names other objects: the stored features are not read, the tower runs, and the results are the new tower's."""
    model, processor, adapter = loaded(family)
    batch = _batches(processor, adapter, video, sharing=True)
    uri = str(tmp_path / "vision_features")
    seen = _count_videos(model, monkeypatch)
    with torch.no_grad():
        first = features.FeatureCache(2**26, features.FeatureStore(uri))
        train.pair_logps(model, adapter, batch("AB"), cache=first)
        assert len(seen) == 1 and (first.store.loaded, first.store.saved) == (0, 2)
        seen.clear()
        second = features.FeatureCache(2**26, features.FeatureStore(uri))
        train.pair_logps(model, adapter, batch("BAB"), cache=second)
        assert seen == [] and (second.store.loaded, second.store.saved) == (2, 0)
        _same_logps(model, adapter, batch("BAB"), second)
        assert "0 video(s) through the tower" in second.summary() and "2 read from and 0 written" in second.summary()
        _, weight = models.vision_parameters(model)[0]
        kept = weight.detach().clone()
        try:
            weight.add_(1e-2)
            seen.clear()
            third = features.FeatureCache(2**26, features.FeatureStore(uri))
            train.pair_logps(model, adapter, batch("A"), cache=third)
            assert len(seen) == 1 and (third.store.loaded, third.store.saved) == (0, 1)
            _same_logps(model, adapter, batch("A"), third)
        finally:
            weight.copy_(kept)
    assert len(list((tmp_path / "vision_features").rglob("*.safetensors"))) == 3


def test_store_on_s3_keeps_features_and_their_form(s3_root):
    from safetensors.torch import save

    from leanpo_core import io

    store = features.FeatureStore(f"{s3_root}/vision_features")
    value = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    name = store.name("d" * 64, {"pixel_values_videos": torch.ones(2, 3), "video_grid_thw": torch.tensor([[1, 2, 2]])})
    assert name.startswith(f"{s3_root}/vision_features/{'d' * 16}/") and store.load(name) is None
    store.save(name, value, stacked=True)
    loaded, stacked = store.load(name)
    assert stacked and loaded.dtype == torch.bfloat16 and torch.equal(loaded, value)
    other = store.name("d" * 64, {"pixel_values_videos": torch.ones(2, 3) * 2,
                                  "video_grid_thw": torch.tensor([[1, 2, 2]])})
    assert other != name and store.load(other) is None
    for damaged in (b"not safetensors", b"\x08" + b"\x00" * 7 + b"{broken}", save({"other": value})):
        io.write_bytes(other, damaged)
        assert store.load(other) is None  # computed again and overwritten, never used
    assert (store.loaded, store.damaged) == (1, 3)
    assert features.store_uri(f"{s3_root}/run/frames/") == f"{s3_root}/run/vision_features"


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


def test_a_second_training_run_reads_the_persisted_features(pair_data, toy_dirs, tmp_path, monkeypatch):
    """With persist_vision_features the first run saves its one video's features beside the frames table; a second
    run (a new cache, as in a new process) reads them, runs no tower, and logs the same losses."""
    import shutil

    from leanpo_core import io, schemas

    pairs_uri, frames_uri = pair_data
    frames_copy = shutil.copytree(frames_uri, tmp_path / "frames")  # the store goes beside it: tmp_path
    caches, original = [], features.FeatureCache
    monkeypatch.setattr(features, "FeatureCache", lambda *a, **k: caches.append(original(*a, **k)) or caches[-1])
    losses = []
    for run in ("first", "second"):
        config = _config(toy_dirs["qwen2_vl"], persist_vision_features=True)
        result = train.train(config, pairs_uri, str(frames_copy), str(tmp_path / run))
        losses.append(io.read_table(result.metrics_uri, schemas.TRAIN_METRICS).column("loss").to_pylist())
    first, second = caches
    assert (first.store.loaded, first.store.saved, first.misses) == (0, 1, 1)
    assert (second.store.loaded, second.store.saved, second.misses) == (1, 0, 1)
    assert first.store.uri == str(tmp_path / "vision_features")
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert not TrainConfig(model="x").persist_vision_features  # off by default
