"""Trainer: the lean pair forward against the naive one, objectives, and short training runs on toy models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from leanpo_core import io, models, schemas, train
from leanpo_core.config import TrainConfig

from .conftest import FAMILIES


def _pair_batch(processor, adapter, video, texts):
    """A collated batch of pairs on the fixture video (first 4 frames), one (chosen, rejected) per entry."""
    frames, meta = video
    clip = frames[:4]
    meta = models.video_metadata(clip, fps=meta["fps"], frames_indices=meta["frames_indices"][:4],
                                 total_num_frames=meta["total_num_frames"])
    items = []
    for question, chosen, rejected in texts:
        prompt = adapter.build_prompt(processor, question)
        items.append({"chosen": adapter.encode(processor, clip, prompt, chosen, meta=meta),
                      "rejected": adapter.encode(processor, clip, prompt, rejected, meta=meta),
                      "chosen_baseline": -2.0, "rejected_baseline": -3.0})
    pad = getattr(processor, "tokenizer", processor).pad_token_id or 0
    return train.PairCollator(pad)(items)


def _lm_grads(model, value):
    """Gradients of the language model and LM head (the vision tower's differ in how often it ran, not in value)."""
    model.zero_grad()
    value.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if ("language_model" in n or n.startswith("lm_head")) and p.grad is not None}


def _count_videos(model, monkeypatch):
    """Record how many pixel rows each `get_video_features` call encodes."""
    backbone = model.model
    seen, original = [], backbone.get_video_features

    def counting(pixels, *args, **kwargs):
        seen.append(pixels.shape[0])
        return original(pixels, *args, **kwargs)

    monkeypatch.setattr(backbone, "get_video_features", counting)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_lean_forward_matches_naive(family, loaded, video, monkeypatch):
    """Vision once + response-only logits give the naive concatenated forward's log-prob sums, loss and LM grads.

    Two pairs of different response lengths, so right padding and the chosen/rejected row layout are exercised.
    """
    model, processor, adapter = loaded(family)
    batch = _pair_batch(processor, adapter, video, [
        ("What moves?", " a red square moves left", " a blue circle"),
        ("What colour is it?", " red", " it is green and large and slow"),
    ])
    config = TrainConfig(model="x", smoothing_threshold=math.inf)  # every pair gated: both smoothing terms live
    seen = _count_videos(model, monkeypatch)
    lean_sums, lean_counts = train.pair_logps(model, adapter, batch, chunk_size=7)
    naive_sums, naive_counts = train.naive_pair_logps(model, batch)
    pixels = batch[models.VIDEO_PIXELS].shape[0]
    assert seen == [pixels, 2 * pixels]  # lean: each pair's video once; naive: once per sequence
    assert torch.equal(lean_counts, naive_counts)
    torch.testing.assert_close(lean_sums, naive_sums, atol=1e-5, rtol=0)
    lean = train.objective_loss(config, lean_sums, lean_counts, batch)
    naive = train.objective_loss(config, naive_sums, naive_counts, batch)
    assert abs(lean.loss.item() - naive.loss.item()) < 1e-5
    lean_grads, naive_grads = _lm_grads(model, lean.loss), _lm_grads(model, naive.loss)
    model.zero_grad()
    assert lean_grads and lean_grads.keys() == naive_grads.keys()
    for name in lean_grads:
        torch.testing.assert_close(lean_grads[name], naive_grads[name], atol=1e-5, rtol=0, msg=name)


QUESTIONS = [("What moves?", "A red square moves left.", "A blue circle."),
             ("What colour is the square?", "Red.", "It is green and large."),
             ("Where does it go?", "To the left side.", "Up."),
             ("How many shapes?", "One shape.", "Many many shapes everywhere.")]


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory, video):
    """A frames shard holding the fixture's 16 frames (stored at 4 of them) and 4 kept pairs + 1 dropped."""
    frames, meta = video
    root = tmp_path_factory.mktemp("pairdata")
    clip = np.ascontiguousarray(frames[::4])
    indices = meta["frames_indices"][::4]
    frame_row = {"video_key": "k0", "video": "clip.mp4", "decoder": "decord", "sampling": "uniform:4",
                 "frame_indices": indices, "timestamps": [i / meta["fps"] for i in indices], "fps": meta["fps"],
                 "duration": meta["total_num_frames"] / meta["fps"], "num_frames_total": meta["total_num_frames"],
                 "width": clip.shape[2], "height": clip.shape[1], "frames_shape": list(clip.shape),
                 "frames": clip.tobytes(), "config_hash": "h"}
    frames_uri = str(root / "frames")
    io.write_shard([frame_row], frames_uri, schemas.FRAMES, 0)
    rows = []
    for i, (question, chosen, rejected) in enumerate(QUESTIONS + [QUESTIONS[0]]):
        rows.append({"pair_id": f"p{i}", "id": f"q{i}", "prompt": question, "chosen": chosen, "rejected": rejected,
                     "video": "clip.mp4", "video_key": "k0", "frames_uri": io.shard_uri(frames_uri, 0),
                     "chosen_frame_indices": indices, "rejected_frame_indices": indices,
                     "chosen_score": 1.0, "rejected_score": 0.0,
                     "chosen_gen_logp": -0.5, "rejected_gen_logp": -1.5,
                     "chosen_sft_logp": -4.0 if i % 2 == 0 else None, "rejected_sft_logp": -5.0,
                     "kept": i < 4, "drop_reason": None if i < 4 else "trust", "model_revision": "r", "round": 0,
                     "config_hash": "h"})
    pairs_uri = str(root / "pairs.parquet")
    io.write_table(rows, pairs_uri, schemas.PAIRS)
    return pairs_uri, frames_uri


def _config(model_dir, **overrides) -> TrainConfig:
    values = dict(model=str(model_dir), max_steps=3, learning_rate=5e-3, warmup_ratio=0.0, deepspeed="none",
                  per_device_batch_size=2, save_steps=2, gradient_checkpointing=False, seed=0)
    return TrainConfig(**{**values, **overrides})


def _params(model, part: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if part in n}


def test_dataset_reads_kept_pairs_with_sft_baseline(pair_data, loaded, toy_dirs):
    """Dropped pairs are skipped; the baseline is the SFT rbar where stored, else the generation-time one.

    Pair p0 stores chosen_sft_logp -4.0 -> baseline -4.0; p1 stores none -> chosen_gen_logp -0.5; rejected: -5.0.
    """
    _, processor, adapter = loaded("qwen2_vl")
    dataset = train.PairsDataset(*pair_data, processor, adapter, max_length=4096)
    assert len(dataset) == 4
    assert [dataset[i]["chosen_baseline"] for i in (0, 1)] == [-4.0, -0.5]
    assert dataset[1]["rejected_baseline"] == -5.0
    sums = torch.tensor([-4.0, -1.0, -10.0, -20.0])  # chosen rbar -4/2 = -2 and -1/1 = -1; rejected -5, -10
    counts = torch.tensor([2, 1, 2, 2])
    batch = {"chosen_baseline": torch.tensor([-4.0, -0.5]), "rejected_baseline": torch.tensor([-5.0, -5.0])}
    out = train.objective_loss(_config(toy_dirs["qwen2_vl"]), sums, counts, batch)
    # displacement/chosen = mean(-2 - -4, -1 - -0.5) = mean(2, -0.5) = 0.75; rejected: mean(0, -5) = -2.5
    assert out.metrics["displacement/chosen"] == pytest.approx(0.75)
    assert out.metrics["displacement/rejected"] == pytest.approx(-2.5)


def test_leanpo_trains_logs_and_exports(pair_data, toy_dirs, tmp_path, loaded, video):
    """A few LeanPO steps: finite loss, LM changed, vision frozen, metrics table + PNG, exported folder reloads."""
    family = "qwen2_vl"
    before, _, adapter = models.load_model(toy_dirs[family])
    out = tmp_path / "run"
    result = train.train(_config(toy_dirs[family], gradient_checkpointing=True), *pair_data, str(out))
    assert result.steps == 3 and math.isfinite(result.final_loss)
    trained = result.model
    lm_before, lm_after = _params(before, "language_model"), _params(trained, "language_model")
    assert any(not torch.equal(lm_before[n], lm_after[n]) for n in lm_before)
    vis_before, vis_after = _params(before, "visual"), _params(trained, "visual")
    assert vis_before and all(torch.equal(vis_before[n], vis_after[n]) for n in vis_before)

    table = io.read_table(result.metrics_uri, schemas.TRAIN_METRICS)
    assert table.num_rows == 3 and table.column("step").to_pylist() == [1, 2, 3]
    for column in ("loss", "loss/pair", "loss/sft", "learning_rate", "grad_norm", "rewards/margins",
                   "logps/chosen", "logps/rejected", "label_smoothing/active_fraction",
                   "displacement/chosen", "displacement/rejected"):
        assert table.column(column).null_count == 0, column
    assert (out / "metrics.png").stat().st_size > 0
    assert (out / "checkpoint-2").is_dir() and list((out / "runs").rglob("events.out.tfevents*"))

    reloaded, processor, _ = models.load_model(result.model_dir)
    assert list((out / "model").glob("*.safetensors"))
    frames, meta = video
    inputs = adapter.encode(processor, frames[:4], adapter.build_prompt(processor, "What moves?"), " left")
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trained(**inputs).logits, atol=1e-5, rtol=0)


def test_dpo_keeps_reference_frozen(pair_data, toy_dirs, tmp_path, monkeypatch):
    """DPO trains with a frozen reference copy, which ends where it started."""
    seen = {}
    original = train._make_trainer_class

    def capture():
        trainer_cls, callback_cls = original()

        class Capturing(trainer_cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                seen["ref"] = self.ref_model
                seen["start"] = {n: p.detach().clone() for n, p in self.ref_model.named_parameters()}

        return Capturing, callback_cls

    monkeypatch.setattr(train, "_make_trainer_class", capture)
    result = train.train(_config(toy_dirs["llava_onevision"], objective="dpo", max_steps=2), *pair_data,
                         str(tmp_path / "dpo"))
    assert math.isfinite(result.final_loss)
    ref = seen["ref"]
    assert not ref.training and all(torch.equal(p, seen["start"][n]) for n, p in ref.named_parameters())
    assert any(not torch.equal(p, seen["start"][n]) for n, p in result.model.named_parameters())


def test_sft_lowers_chosen_nll(pair_data, toy_dirs, tmp_path, loaded):
    """SFT on the same 4 pairs for a few epochs lowers the chosen responses' token-mean NLL."""
    family = "llava_next_video"
    model, processor, adapter = loaded(family)
    dataset = train.PairsDataset(*pair_data, processor, adapter, max_length=4096)
    batch = train.PairCollator(getattr(processor, "tokenizer", processor).pad_token_id or 0)(
        [dataset[i] for i in range(len(dataset))])

    def chosen_nll(m):
        with torch.no_grad():
            sums, counts = train.pair_logps(m, adapter, batch)
        return float(-sums[:4].sum() / counts[:4].sum())

    result = train.train(_config(toy_dirs[family], objective="sft", max_steps=6, per_device_batch_size=4,
                                 save_steps=100), *pair_data, str(tmp_path / "sft"))
    result.model.eval()
    assert chosen_nll(result.model) < chosen_nll(model) - 0.1


def test_lora_cli_run_exports_merged_model(pair_data, toy_dirs, tmp_path, video):
    """The CLI with LoRA (SimPO): adapters train, the export is a merged plain folder that differs from the base."""
    import json

    family = "qwen2_5_vl"
    config = _config(toy_dirs[family], objective="simpo", lora=True, lora_rank=4, max_steps=2, learning_rate=5e-2)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config.model_dump(mode="json")))
    result = train.main(["--config", str(path), "--pairs", pair_data[0], "--frames", pair_data[1],
                         "--out", str(tmp_path / "lora")])
    assert result.steps == 2 and math.isfinite(result.final_loss)
    base, processor, adapter = models.load_model(toy_dirs[family])
    merged, _, _ = models.load_model(result.model_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    frames, _ = video
    inputs = adapter.encode(processor, frames[:4], adapter.build_prompt(processor, "What moves?"), " left")
    with torch.no_grad():
        assert not torch.allclose(base(**inputs).logits, merged(**inputs).logits)
    vis = _params(base, "visual")
    assert all(torch.equal(vis[n], p) for n, p in _params(merged, "visual").items())


@pytest.mark.slow
def test_two_rank_deepspeed_zero2_and_zero3(pair_data, toy_dirs, tmp_path, tmp_path_factory):
    """Real 2-rank DeepSpeed on CPU (gloo) via torchrun: both stages train, export, and end at the same weights."""
    import json
    import os
    import sys

    from leanpo_core import launch

    family = "qwen2_vl"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(tmp_path_factory.getbasetemp() / "torch_extensions")}
    exported = {}
    for stage in ("zero2", "zero3"):
        config = _config(toy_dirs[family], deepspeed=stage, per_device_batch_size=1, max_steps=2, learning_rate=1e-3,
                         gradient_checkpointing=True)
        path = tmp_path / f"{stage}.json"
        path.write_text(json.dumps(config.model_dump(mode="json")))
        out = tmp_path / stage
        launch.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "leanpo_core.train",
                    "--config", str(path), "--pairs", pair_data[0], "--frames", pair_data[1], "--out", str(out)],
                   env=env, timeout_s=600, log=lambda line: None)
        table = io.read_table(str(out / "metrics.parquet"), schemas.TRAIN_METRICS)
        assert table.num_rows == 2 and all(math.isfinite(v) for v in table.column("loss").to_pylist())
        exported[stage] = models.load_model(out / "model")[0].state_dict()
    base = models.load_model(toy_dirs[family])[0].state_dict()
    assert any(not torch.equal(base[k], exported["zero2"][k]) for k in base if "language_model" in k)
    assert all(torch.equal(base[k], exported["zero3"][k]) for k in base if "visual" in k)
    for k in base:
        torch.testing.assert_close(exported["zero2"][k], exported["zero3"][k], atol=1e-4, rtol=0, msg=k)


def test_resume_from_checkpoint_matches_uninterrupted(pair_data, toy_dirs, tmp_path):
    """A run that finds checkpoint-2 in its folder resumes there and ends where an uninterrupted run ends."""
    import shutil

    family = "llava_onevision"
    config = _config(toy_dirs[family], max_steps=4, per_device_batch_size=1, save_steps=2)
    full = train.train(config, *pair_data, str(tmp_path / "full"))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    shutil.copy(tmp_path / "full" / "metrics.parquet", resumed_dir / "metrics.parquet")
    resumed = train.train(config, *pair_data, str(resumed_dir))
    assert resumed.steps == 4
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    steps = io.read_table(resumed.metrics_uri, schemas.TRAIN_METRICS).column("step").to_pylist()
    assert steps == [1, 2, 3, 4]
