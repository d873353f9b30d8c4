"""Trainer: the lean pair forward against the naive one, objectives, and short training runs on toy models."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch

from leanpo_core import io, launch, logps, models, pairdata, schemas, train
from leanpo_core.config import TrainConfig

from .conftest import FAMILIES


def _pair_items(processor, adapter, video, texts):
    """Encoded pairs on the fixture video (first 4 frames), one (chosen, rejected) per (question, chosen, rejected)."""
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
    return items


def _pair_batch(processor, adapter, video, texts, prefix_sharing: bool = False):
    """Those pairs collated: two rows per pair, or one joined row with `prefix_sharing`."""
    pad = getattr(processor, "tokenizer", processor).pad_token_id or 0
    return pairdata.PairCollator(pad, prefix_sharing)(_pair_items(processor, adapter, video, texts))


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
    naive_sums, naive_counts = logps.naive_pair_logps(model, batch)
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


class _CountingProcessor:
    """A processor that counts its calls with videos and otherwise is the processor it wraps."""

    def __init__(self, processor):
        self.processor, self.video_calls = processor, 0

    def __call__(self, *args, **kwargs):
        self.video_calls += bool(kwargs.get("videos"))
        return self.processor(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)


def test_dataset_reads_kept_pairs_with_sft_baseline(pair_data, loaded, toy_dirs):
    """Dropped pairs are skipped; a pair's video is processed once for both sides; the baseline is the SFT rbar
    where stored, else the generation-time one.

    Pair p0 stores chosen_sft_logp -4.0 -> baseline -4.0; p1 stores none -> chosen_gen_logp -0.5; rejected: -5.0.
    """
    _, processor, adapter = loaded("qwen2_vl")
    counting = _CountingProcessor(processor)
    dataset = pairdata.PairsDataset(*pair_data, counting, adapter, max_length=4096)
    assert len(dataset) == 4
    item = dataset[1]
    assert counting.video_calls == 1  # one processor run (tokens + pixels) serves both sides of the pair
    chosen, rejected = item["chosen"], item["rejected"]
    assert torch.equal(chosen[models.VIDEO_PIXELS], rejected[models.VIDEO_PIXELS])
    tokenizer = processor.tokenizer
    prompt_len = int((rejected["labels"][0] == models.IGNORE_INDEX).sum())
    assert torch.equal(rejected["input_ids"][:, :prompt_len], chosen["input_ids"][:, :prompt_len])
    end = tokenizer.convert_tokens_to_ids(adapter.end_of_reply)
    assert rejected["labels"][0, prompt_len:].tolist() == tokenizer(QUESTIONS[1][2], add_special_tokens=False)[
        "input_ids"] + [end]
    assert [dataset[i]["chosen_baseline"] for i in (0, 1)] == [-4.0, -0.5]
    assert item["rejected_baseline"] == -5.0
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

    class Capturing(train.PreferenceTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["ref"] = self.ref_model
            seen["start"] = {n: p.detach().clone() for n, p in self.ref_model.named_parameters()}

    monkeypatch.setattr(train, "PreferenceTrainer", Capturing)
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
    dataset = pairdata.PairsDataset(*pair_data, processor, adapter, max_length=4096)
    batch = pairdata.PairCollator(getattr(processor, "tokenizer", processor).pad_token_id or 0)(
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


DS_STEPS = 3  # 2 ranks x 1 pair per step: the third step starts the second epoch


def _launch_train(stage: str, pair_data, toy_dirs, folder: Path, out: Path, launcher: str,
                  prefix_sharing: bool = True, **kwargs):
    """`python -m leanpo_core.train` on 2 CPU ranks (gloo) under `launcher`, checkpointing every step."""
    config = _config(toy_dirs["qwen2_vl"], deepspeed=stage, per_device_batch_size=1, max_steps=DS_STEPS,
                     save_steps=1, learning_rate=5e-3, prefix_sharing=prefix_sharing)
    path = folder / f"{stage}.json"
    path.write_text(json.dumps(config.model_dump(mode="json")))
    args = ["--config", str(path), "--pairs", pair_data[0], "--frames", pair_data[1], "--out", str(out)]
    env = {"OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    launch.run_module("leanpo_core.train", args, launcher=launcher, nproc_per_node=2, env=env, timeout_s=600,
                      **kwargs)


def _metric_steps_and_losses(out: Path) -> tuple[list[int], list[float]]:
    table = io.read_table(str(out / "metrics.parquet"), schemas.TRAIN_METRICS)
    return table.column("step").to_pylist(), table.column("loss").to_pylist()


@pytest.fixture(scope="module")
def zero2_run(pair_data, toy_dirs, tmp_path_factory):
    """ZeRO-2 on 2 ranks through the `deepspeed` launcher, uninterrupted; its output folder."""
    folder = tmp_path_factory.mktemp("zero2")
    _launch_train("zero2", pair_data, toy_dirs, folder, folder / "out", "deepspeed", log=lambda _: None)
    return folder / "out"


def _pids_of_rank(tag: str, local_rank: int) -> list[int]:
    """Processes started with LEANPO_TEST_RUN=tag and LOCAL_RANK=local_rank (read from /proc/<pid>/environ)."""
    want = {f"LEANPO_TEST_RUN={tag}".encode(), f"LOCAL_RANK={local_rank}".encode()}
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and want <= set((proc / "environ").read_bytes().split(b"\0")):
                pids.append(int(proc.name))
        except OSError:  # gone, or not ours
            continue
    return pids


def test_two_rank_deepspeed_zero2_and_zero3(zero2_run, pair_data, toy_dirs, tmp_path, video, loaded):
    """Real 2-rank DeepSpeed on CPU (gloo): ZeRO-2 through the `deepspeed` launcher; ZeRO-3 through torchrun with
    rank 1 SIGKILLed once checkpoint-1 is complete, then the same command again, which resumes there.

    Both runs: finite losses, each step once in the metrics table, the language model changed and the vision tower
    not, the exported folder reloads with `from_pretrained`; metrics are means over the ranks. ZeRO stages agree to
    fp tolerance, and so do prefix sharing (the ZeRO-2 run, the default) and two sequences per pair (the ZeRO-3
    run), so the resumed ZeRO-3 run must end at the uninterrupted ZeRO-2 run's weights (and log the same losses). The killed launch raises LaunchError naming rank 1 with its own last lines. Real vLLM then loads the
    resumed run's export and generates from a video.
    """
    out = tmp_path / "zero3"
    tag = str(out)
    failures, lines = [], []

    def first_launch():
        try:
            _launch_train("zero3", pair_data, toy_dirs, tmp_path, out, "torchrun", prefix_sharing=False,
                          env={"LEANPO_TEST_RUN": tag}, log=lines.append)
        except launch.LaunchError as exc:
            failures.append(exc)

    runner = threading.Thread(target=first_launch)
    runner.start()
    while runner.is_alive() and not (out / "checkpoint-1" / train.CHECKPOINT_COMPLETE).exists():
        time.sleep(0.05)
    finished_early = (out / f"checkpoint-{DS_STEPS}" / train.CHECKPOINT_COMPLETE).exists()
    victims = _pids_of_rank(tag, 1)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    runner.join()
    assert victims and not finished_early, "rank 1 was not killed mid-run"
    assert len(failures) == 1, "\n".join(lines[-30:])
    error = failures[0]
    assert (error.failed_rank, error.rank_returncode) == (1, -signal.SIGKILL) and not error.deterministic
    assert error.rank_tail and "rank 1 failed with signal 9" in str(error)
    assert "\n".join(error.rank_tail) in str(error)
    assert not (out / "model").exists()

    _launch_train("zero3", pair_data, toy_dirs, tmp_path, out, "torchrun", prefix_sharing=False,
                  log=lambda _: None)

    base = models.load_model(toy_dirs["qwen2_vl"])[0].state_dict()
    exported, losses = {}, {}
    for stage, folder in (("zero2", zero2_run), ("zero3", out)):
        steps, losses[stage] = _metric_steps_and_losses(folder)
        assert steps == list(range(1, DS_STEPS + 1)), (stage, steps)
        assert all(math.isfinite(v) for v in losses[stage]), stage
        exported[stage] = models.load_model(folder / "model")[0].state_dict()
        assert exported[stage].keys() == base.keys()
        assert any(not torch.equal(base[k], exported[stage][k]) for k in base if "language_model" in k), stage
        assert all(torch.equal(base[k], exported[stage][k]) for k in base if "visual" in k), stage
    # Metrics are means over ranks: step 1 (base weights, one pair per rank) logs the mean rbar of two pairs.
    model, processor, adapter = loaded("qwen2_vl")
    dataset = pairdata.PairsDataset(*pair_data, processor, adapter, max_length=4096)
    collate = pairdata.PairCollator(processor.tokenizer.pad_token_id or 0)
    with torch.no_grad():
        rbar = [float(s[0] / c[0]) for s, c in (train.pair_logps(model, adapter, collate([dataset[i]]))
                                                for i in range(len(dataset)))]
    candidates = [("one rank", r) for r in rbar] + [("two ranks", (a + b) / 2) for a, b in combinations(rbar, 2)]
    step1 = io.read_table(str(zero2_run / "metrics.parquet"), schemas.TRAIN_METRICS).column("logps/chosen")[0]
    kind, value = min(candidates, key=lambda c: abs(c[1] - step1.as_py()))
    assert kind == "two ranks" and value == pytest.approx(step1.as_py(), abs=1e-4), (step1, candidates)
    # Each step moves the weights by ~lr (5e-3); the stages differ by reduction order only (worst seen: 1.4e-5, on
    # k_proj biases, whose true gradient is 0 and whose noise Adam normalises).
    assert losses["zero3"] == pytest.approx(losses["zero2"], rel=1e-4)
    for k in base:
        torch.testing.assert_close(exported["zero2"][k], exported["zero3"][k], atol=1e-4, rtol=0, msg=k)

    frames, meta = video
    np.save(tmp_path / "frames.npy", frames[::4])
    (tmp_path / "meta.json").write_text(json.dumps(models.video_metadata(
        frames[::4], fps=meta["fps"], frames_indices=meta["frames_indices"][::4],
        total_num_frames=meta["total_num_frames"])))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_probe.py")), "--frames",
                           str(tmp_path / "frames.npy"), "--meta", str(tmp_path / "meta.json"), "--out",
                           str(tmp_path / "vllm.json"), str(out / "model")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert (tmp_path / "vllm.json").exists(), f"vLLM probe wrote nothing (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    result = json.loads((tmp_path / "vllm.json").read_text())[str(out / "model")]
    assert "error" not in result, result.get("error")
    assert result["samples"] and all(len(s["token_ids"]) > 0 for s in result["samples"])


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


def test_resume_point_is_the_newest_complete_checkpoint(tmp_path):
    """Only checkpoints marked complete count (numerically newest wins); newer half-written ones are removed."""
    for step in (2, 10, 11):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}" / train.CHECKPOINT_COMPLETE).write_text(f"{step}\n")
    last = train.last_complete_checkpoint(str(tmp_path))
    assert last == str(tmp_path / "checkpoint-10")
    train._remove_incomplete_checkpoints(str(tmp_path), last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-2"]
    assert train.last_complete_checkpoint(str(tmp_path / "missing")) is None
