"""The toy world: a deterministic, content-keyed build; the shipped SFT model matches the code and reads the video."""

import collections
import json

import numpy as np
import pytest

from leanpo_core import models, synthetic, toyworld

SMALL = toyworld.WorldSettings(clips=20, pretrain_clips=8, pretrain_epochs=1, sft_epochs=1)


def test_build_is_deterministic_per_seed_and_reused_when_inputs_are_unchanged(tmp_path):
    logs = []
    first = toyworld.build_world(tmp_path / "a", SMALL, log=logs.append)
    second = toyworld.build_world(tmp_path / "b", SMALL, log=logs.append)
    weights = (first / "model.safetensors").read_bytes()
    assert weights == (second / "model.safetensors").read_bytes()  # same seed and settings: the same weights
    record = json.loads((first / "world.json").read_text())
    assert record["key"] == SMALL.key() and record["settings"]["clips"] == 20
    assert {"vision_pretraining", "sft", "blind_baselines", "seconds", "command"} <= set(record)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    logs.clear()
    assert toyworld.build_world(tmp_path / "a", SMALL, log=logs.append) == first
    assert logs == [f"toy world {SMALL.key()[:12]} reused: {first}"]
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # nothing rebuilt
    other = toyworld.WorldSettings(**{**SMALL.__dict__, "seed": 1})
    assert other.key() != SMALL.key()
    assert toyworld.ensure_world(tmp_path / "cache", SMALL, log=logs.append) == tmp_path / "cache" / SMALL.key()[:16]


def test_world_splits_are_disjoint_and_sized():
    names = synthetic.split_of(800, 0, synthetic.WORLD_SPLITS)
    counts = collections.Counter(names)
    assert counts == {"sft": 280, "train": 240, "validation": 80, "test": 200}
    # the default three-way split is what it always was
    assert synthetic.split_of(10, 0) == synthetic.split_of(10, 0, synthetic.SPLITS)
    assert collections.Counter(synthetic.split_of(10, 0)) == {"train": 8, "validation": 1, "test": 1}
    test = toyworld.split_questions(toyworld.WorldSettings(), "test")
    assert len(test) >= 400 and {synthetic.question_type(r["question"]) for r in test} == {
        "colour", "direction", "shape", "count"}


def test_manifest_of_some_splits_writes_the_same_clips(tmp_path):
    settings = toyworld.WorldSettings(clips=12)
    full = [json.loads(line) for line in toyworld.manifest(tmp_path / "all", settings).read_text().splitlines()]
    some = [json.loads(line) for line in
            toyworld.manifest(tmp_path / "some", settings, only=("test",)).read_text().splitlines()]
    assert some == [row for row in full if row["split"] == "test"] and some
    clips = {row["video"] for row in some}
    assert {p.name for p in (tmp_path / "some" / "clips").iterdir()} == {c.split("/")[-1] for c in clips}
    assert all((tmp_path / "some" / c).read_bytes() == (tmp_path / "all" / c).read_bytes() for c in clips)


def test_the_shipped_world_matches_the_code():
    """The committed SFT model is what `python -m leanpo_core.toyworld build` makes of the committed code; if this
    fails, a change touched what the world is built from: rebuild it into leanpo_core/assets/toy_world."""
    record = json.loads((toyworld.ASSET / "world.json").read_text())
    assert record["key"] == toyworld.WorldSettings().key(), (
        "rebuild: python -m leanpo_core.toyworld build --out leanpo_core/assets/toy_world")
    validation = record["sft"]["epochs"][-1]["validation"]["all"]
    blind = record["blind_baselines"]
    # well above every video-blind baseline, and well below the ceiling
    assert validation["n"] >= 200 and 0.35 <= validation["accuracy"] <= 0.70
    assert validation["accuracy"] > max(blind["uniform"], blind["type_prior"], blind["question_prior"]) + 0.15


def test_the_shipped_world_reads_the_video():
    """The same validation questions with the real frames and with black frames: the answers depend on the video."""
    model, processor, adapter = models.load_model(toyworld.ASSET)
    settings = toyworld.WorldSettings()
    rows = toyworld.split_questions(settings, "validation")[:60]
    real = toyworld._sft_items(settings, rows, processor, adapter, with_variants=False)
    black = []
    for row in rows:
        pixels, _ = toyworld.clip_frames(row["params"], settings.frames)
        batch = adapter.encode(processor, np.zeros_like(pixels), adapter.build_prompt(processor, row["question"]),
                               " " + row["answer"])
        black.append({"inputs": batch, "kind": synthetic.question_type(row["question"]), "answer": row["answer"]})
    seeing = toyworld._accuracy(model, processor, real)["all"]["accuracy"]
    blind = toyworld._accuracy(model, processor, black)["all"]["accuracy"]
    assert seeing >= blind + 0.2, (seeing, blind)


@pytest.mark.parametrize("size", ["world"])
def test_world_size_is_for_qwen_only(tmp_path, size):
    with pytest.raises(ValueError, match="Qwen families"):
        from leanpo_core import toy

        toy.build_toy_model("llava_onevision", tmp_path / "x", size=size)
