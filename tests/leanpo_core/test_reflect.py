"""Reflect stage (leanpo_core.reflect): F1 and rating parsing by hand, SFT log-probs against full logits, judge
records, ranking, failures, resume and determinism, and a real-engine judge run in a subprocess.

Inputs are small VIDEOS / FRAMES / SAMPLES tables built here (no other stage runs); the model is the toy Qwen2-VL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from leanpo_core import engine, frames, io, models, reflect, schemas
from leanpo_core.config import ReflectConfig
from leanpo_core.layout import RunLayout
from leanpo_core.logps import naive_response_logps

REPO = Path(__file__).resolve().parents[2]
FPS, TOTAL = 12.0, 48
QUESTIONS = {"q1": ("What moves in the video?", "A red square moves left."),
             "q2": ("What colour is the square?", "The square is red."),
             "q3": ("What moves in the video?", "The red square moves left.")}  # q1's clip and question again
KEYS = {"q1": "vk-a", "q2": "vk-b", "q3": "vk-a"}
# two candidates per side for q1 (shard 0); one per side for q2 (shard 1), the losing one cut at max_tokens
SHARDS = {0: [("q1", "win", 0, "A red square moves left across the video.", "stop"),
              ("q1", "win", 1, "The square is red.", "stop"),
              ("q1", "lose", 0, "A blue circle moves up.", "stop"),
              ("q1", "lose", 1, "There are two balls", "stop")],
          1: [("q2", "win", 0, "The square in the video is red.", "stop"),
              ("q2", "lose", 0, "the green ball rotates and", "length")]}


def clips(video) -> dict[str, tuple[np.ndarray, list[int]]]:
    """video_key -> (frames, source indices): the 16-frame clip and every other frame of it (another shape)."""
    frames, meta = video
    return {"vk-a": (frames, meta["frames_indices"]), "vk-b": (frames[::2], meta["frames_indices"][::2])}


def frames_row(key: str, frames: np.ndarray, indices: list[int]) -> dict:
    return {"video_key": key, "video": f"{key}.mp4", "decoder": "decord", "sampling": f"uniform:{len(frames)}",
            "frame_indices": indices, "timestamps": [i / FPS for i in indices], "fps": FPS, "duration": TOTAL / FPS,
            "num_frames_total": TOTAL, "width": 128, "height": 96, "frames_shape": list(frames.shape),
            "frames": frames.tobytes(), "config_hash": "frames-test"}


def sample_row(qid: str, side: str, candidate: int, response: str, finish: str = "stop", key: str | None = None,
               round_: int = 0) -> dict:
    return {"id": qid, "video_key": key or KEYS.get(qid, "vk-a"), "side": side, "candidate": candidate, "round": round_,
            "question": QUESTIONS.get(qid, ("?", ""))[0], "hint_response": "hint reply" if side == "win" else None,
            "response": response, "gen_mean_logprob": -1.0 - 0.25 * candidate, "gen_num_tokens": 6,
            "finish_reason": finish, "frame_indices": [0, 47] if side == "lose" else list(range(16)),
            "augmentation": "{}" if side == "lose" else None, "seed": 0, "model_revision": "toy-rev",
            "config_hash": "sample-test"}


def write_run(root: str, video, shards: dict[int, list[tuple]] = SHARDS, options=None) -> RunLayout:
    """A run root holding videos.parquet, one frames shard (vk-a, vk-b) and the given samples shards."""
    layout = RunLayout(root)
    io.write_table([{"id": q, "video": f"{KEYS[q]}.mp4", "question": qa[0], "answer": qa[1], "split": "train",
                     "source": "test", "chosen": None, "rejected": None} for q, qa in QUESTIONS.items()],
                   layout.videos, schemas.VIDEOS, options)
    io.write_shard([frames_row(k, f, i) for k, (f, i) in clips(video).items()], layout.frames, schemas.FRAMES, 0,
                   options)
    for index, rows in shards.items():
        io.write_shard([sample_row(*row) for row in rows], layout.samples, schemas.SAMPLES, index, options)
    return layout


def run(layout: RunLayout, config: ReflectConfig, model_dir, options=None) -> list[io.Manifest]:
    return reflect.run_reflect(layout.videos, layout.frames, layout.samples, layout.scored,
                               layout.failures("reflect"), config, str(model_dir), options)


def naive_mean_logp(loaded_model, frames, indices, question, response, add_end=True) -> tuple[float, int]:
    """rbar from full-sequence logits of one unbatched sequence: the reference for the stage's lean batched path."""
    model, processor, adapter = loaded_model
    meta = models.video_metadata(frames, fps=FPS, frames_indices=indices, total_num_frames=TOTAL)
    inputs = adapter.encode(processor, frames, adapter.build_prompt(processor, question), response, meta=meta,
                            add_end=add_end)
    with torch.no_grad():
        total, count = naive_response_logps(model(**inputs).logits, inputs["labels"])
    return total.item() / count.item(), count.item()


def test_normalize_and_token_f1_by_hand():
    """"a red square moves left" vs "The red square moves right.": 3 of 4 tokens shared each way, P = R = 0.75,
    F1 = 0.75. "red red square" vs "red square": overlap counts min(2, 1) + 1 = 2, P = 2/3, R = 1, F1 = 0.8."""
    assert reflect.normalize_answer("The  Red, square!  moves an inch.") == "red square moves inch"
    assert reflect.token_f1("a red square moves left", "The red square moves right.") == pytest.approx(0.75)
    assert reflect.token_f1("red red square", "red square") == pytest.approx(0.8)
    assert reflect.token_f1("An apple.", "apple") == 1.0
    assert reflect.token_f1("blue", "red") == 0.0
    assert reflect.token_f1("", "") == 1.0 and reflect.token_f1("the", "red") == 0.0


@pytest.mark.parametrize("reply, expected", [
    ("7", 6 / 9), ("Rating: 10/10", 1.0), ("**8**", 7 / 9), ("I'd say 6 out of 10", 5 / 9), ("1", 0.0),
    ("zero", None), ("11", None), ("", None), (None, None), ("square square moves", None),
])
def test_judge_outcome_on_crafted_replies(reply, expected):
    score, status = reflect.judge_outcome(reply)
    assert status == ("unparsable" if expected is None else "ok")
    assert score == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_next_video", "llava_onevision"])
def test_batched_scores_equal_naive_full_logits(family, loaded, video):
    """Right-padded batches (different response lengths, a cut response) give each row's unbatched full-logit rbar."""
    model, processor, adapter = loaded(family)
    frames, meta = video
    items = [{"frames": frames, "meta": meta, "question": q, "response": r, "finish_reason": f}
             for q, r, f in [("What moves?", "A red square moves left across the video.", "stop"),
                             ("What colour?", "red", "stop"), ("What moves?", "the square moves", "length")]]
    got = reflect.sft_scores(model, processor, adapter, items, batch_size=3)
    for item, (mean, count) in zip(items, got):
        want_mean, want_count = naive_mean_logp(loaded(family), frames, meta["frames_indices"], item["question"],
                                                item["response"], add_end=item["finish_reason"] != "length")
        assert count == want_count
        assert mean == pytest.approx(want_mean, abs=1e-5)
    assert got[2][1] == len(processor.tokenizer("the square moves", add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_next_video", "llava_onevision"])
def test_feature_cache_runs_the_tower_once_per_video(family, loaded, video, monkeypatch):
    """With a feature cache, five responses on two videos (over two calls, as over two shards) run the vision tower
    on two videos in all, and score what recomputation scores (1e-6)."""
    from leanpo_core import features

    from .test_train import _count_videos

    model, processor, adapter = loaded(family)
    frames, meta = video
    clips = {}
    for key, start in (("a", 0), ("b", 4)):
        clip = frames[start:start + 4]
        clips[key] = (clip, models.video_metadata(clip, fps=meta["fps"],
                                                  frames_indices=meta["frames_indices"][start:start + 4],
                                                  total_num_frames=meta["total_num_frames"]))
    items = [{"video_key": key, "frames": clips[key][0], "meta": clips[key][1], "question": q, "response": r,
              "finish_reason": "stop"}
             for key, q, r in [("a", "What moves?", "a red square"), ("b", "What moves?", "a blue circle moves up"),
                               ("a", "What colour?", "red"), ("b", "What colour?", "blue"), ("a", "Is it?", "yes")]]
    want = reflect.sft_scores(model, processor, adapter, items, batch_size=2)
    cache = features.FeatureCache(2**30)
    seen = _count_videos(models.unwrap(model), monkeypatch)
    got = reflect.sft_scores(model, processor, adapter, items[:3], batch_size=2, cache=cache)
    got += reflect.sft_scores(model, processor, adapter, items[3:], batch_size=2, cache=cache)
    # batches [a, b] and [a], then [b, a]: one tower call for both videos, every later look-up a hit
    assert len(seen) == 1 and (cache.misses, cache.hits, len(cache)) == (2, 3, 2)
    for (mean, count), (want_mean, want_count) in zip(got, want):
        assert count == want_count and mean == pytest.approx(want_mean, abs=1e-6)
    assert reflect.video_id(items[0]) == f"a@{','.join(map(str, meta['frames_indices'][:4]))}"
    assert reflect.video_id({"frames": frames, "meta": meta}) is None  # no key: scored without the cache


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_next_video", "llava_onevision"])
def test_shared_prompt_rows_score_what_separate_rows_score(family, loaded, video, monkeypatch):
    """A question's responses joined into one row (prefix.join_responses): the separate rows' rbar and token counts
    (1e-5), with a cut response, a question answered once, and a question split over two batches; the language
    model reads each prompt once per row."""
    from leanpo_core import prefix

    model, processor, adapter = loaded(family)
    frames, meta = video
    clip = frames[:4]
    clip_meta = models.video_metadata(clip, fps=meta["fps"], frames_indices=meta["frames_indices"][:4],
                                      total_num_frames=meta["total_num_frames"])
    other = frames[4:8]
    other_meta = models.video_metadata(other, fps=meta["fps"], frames_indices=meta["frames_indices"][4:8],
                                       total_num_frames=meta["total_num_frames"])
    spec = [(clip, clip_meta, "What moves?", "a red square", "stop"),
            (other, other_meta, "What moves?", "a blue circle moves up", "stop"),
            (clip, clip_meta, "What moves?", "nothing at all", "length"),
            (clip, clip_meta, "What colour?", "red", "stop"),
            (clip, clip_meta, "What moves?", "the square", "stop"),
            (clip, clip_meta, "What moves?", "it moves left and then right", "stop")]
    items = [{"video_key": "b" if f is other else "a", "frames": f, "meta": m, "question": q, "response": r,
              "finish_reason": fr} for f, m, q, r, fr in spec]
    want = reflect.sft_scores(model, processor, adapter, items, batch_size=3)
    batches = list(reflect.scoring_batches(processor, adapter, items, 3, "cpu", share_prompt=True))
    # "What moves?" on clip a has 4 responses: a row of 3 (a batch holds at most 3 responses), then a row of 1
    # beside the two questions answered once; output sequence (s - 1) * rows + row
    assert [slots for slots, _ in batches] == [[0, 2, 4], [5, 1, 3]]
    assert [tuple(b[prefix.LENGTHS].shape) for _, b in batches] == [(1, 4), (3, 2)]
    for cache in (None, features_cache()):
        got = reflect.sft_scores(model, processor, adapter, items, batch_size=3, cache=cache, share_prompt=True)
        for (mean, count), (want_mean, want_count) in zip(got, want):
            assert count == want_count and mean == pytest.approx(want_mean, abs=1e-5)


def features_cache():
    from leanpo_core import features

    return features.FeatureCache(2**30)


def test_stage_scores_ranks_and_matches_naive_logps(tmp_path, toy_dirs, video, loaded):
    config = ReflectConfig(judge=False, sft_logp_weight=0.5, batch_size=3)
    layout = write_run(str(tmp_path), video)
    manifests = run(layout, config, toy_dirs["qwen2_vl"])
    assert [m.rows for m in manifests] == [4, 2]
    rows = io.read_dataset(layout.scored, schemas.SCORED).to_pylist()
    by = {(r["id"], r["side"], r["candidate"]): r for r in rows}
    assert len(by) == 6 and all(r["judge_status"] == "off" and r["judge_score"] is None for r in rows)
    for r in rows:
        f1 = reflect.token_f1(r["response"], QUESTIONS[r["id"]][1])
        assert r["prior_f1"] == pytest.approx(f1)
        assert r["score"] == pytest.approx(f1 + 0.5 * r["sft_mean_logprob"])
        assert r["config_hash"] == reflect.stage_hash(config, str(toy_dirs["qwen2_vl"]))
        assert r["model_revision"] == "toy-rev" and r["gen_mean_logprob"] == -1.0 - 0.25 * r["candidate"]
    for qid, side in [("q1", "win"), ("q1", "lose"), ("q2", "win")]:
        group = sorted((r for r in rows if (r["id"], r["side"]) == (qid, side)), key=lambda r: r["rank"])
        assert [r["rank"] for r in group] == list(range(len(group)))
        assert [r["score"] for r in group] == sorted((r["score"] for r in group), reverse=True)
    # both sides are scored on the CLEAN frames with the PLAIN question, whatever view they were sampled from
    for key, add_end in [(("q1", "lose", 1), True), (("q2", "lose", 0), False)]:
        frames, indices = clips(video)[KEYS[key[0]]]
        mean, count = naive_mean_logp(loaded("qwen2_vl"), frames, indices, QUESTIONS[key[0]][0],
                                      by[key]["response"], add_end=add_end)
        assert by[key]["sft_mean_logprob"] == pytest.approx(mean, abs=1e-5) and by[key]["sft_num_tokens"] == count


class FakeEngine:
    """Replies by candidate response, records the requests it got."""

    def __init__(self, replies, model_dir):
        from transformers import AutoProcessor

        self.replies, self.requests, self.closed = replies, [], False
        self.adapter, self.processor = models.adapter_for(model_dir), AutoProcessor.from_pretrained(model_dir)

    def generate(self, requests):
        self.requests.extend(requests)
        return [[engine.Completion(text=self.replies(r.prompt), token_ids=(1,), mean_logprob=-1.0, num_tokens=1,
                                   finish_reason="stop")] for r in requests]

    def close(self):
        self.closed = True


def test_judge_replies_are_parsed_or_recorded_as_unparsable(tmp_path, toy_dirs, video, monkeypatch):
    replies = {"A red square moves left across the video.": "Rating: 9", "The square is red.": "no idea",
               "A blue circle moves up.": "2/10", "There are two balls": ""}
    fake = FakeEngine(lambda prompt: next(v for k, v in replies.items() if f"Candidate answer: {k}" in prompt),
                      toy_dirs["qwen2_vl"])
    opened = []
    monkeypatch.setattr(engine, "open_engine", lambda model, **kw: opened.append((model, kw)) or fake,
                        raising=False)
    config = ReflectConfig(judge=True, judge_weight=2.0, judge_max_tokens=7, backend="transformers")
    layout = write_run(str(tmp_path), video, {0: SHARDS[0]})
    reads = []
    real_load = frames.FrameStore.load
    monkeypatch.setattr(frames.FrameStore, "load", lambda self, keys: reads.append(keys) or real_load(self, keys))
    run(layout, config, toy_dirs["qwen2_vl"])
    assert len(reads) == 1  # the judge pass reuses the likelihood pass's frames: each shard's are read once
    rows = {r["response"]: r for r in io.read_dataset(layout.scored, schemas.SCORED).to_pylist()}
    assert opened == [(str(toy_dirs["qwen2_vl"]), {"backend": "transformers", "max_tokens_hint": 7})] and fake.closed
    assert {r: (rows[r]["judge_status"], rows[r]["judge_raw"]) for r in replies} == {
        "A red square moves left across the video.": ("ok", "Rating: 9"),
        "The square is red.": ("unparsable", "no idea"),
        "A blue circle moves up.": ("ok", "2/10"), "There are two balls": ("unparsable", "")}
    top = rows["A red square moves left across the video."]
    assert top["judge_score"] == pytest.approx(8 / 9)
    assert top["score"] == pytest.approx(2.0 * 8 / 9 + top["prior_f1"])
    assert rows["The square is red."]["score"] == pytest.approx(rows["The square is red."]["prior_f1"])
    assert all(r.temperature == 0 and r.max_tokens == 7 and r.n == 1 for r in fake.requests)
    assert all(r.frames.shape[0] == 16 and "Reference answer: A red square moves left" in r.prompt
               for r in fake.requests)


def test_unscorable_candidates_become_failure_rows(tmp_path, toy_dirs, video):
    shard = [*SHARDS[0], ("q1", "win", 2, "A square.", "stop", "vk-missing"), ("q9", "lose", 0, "Nothing.", "stop")]
    layout = write_run(str(tmp_path), video, {0: shard})
    run(layout, ReflectConfig(judge=False), toy_dirs["qwen2_vl"])
    assert io.read_dataset(layout.scored, schemas.SCORED).num_rows == 4
    failures = io.read_dataset(layout.failures("reflect"), schemas.FAILURES).to_pylist()
    assert sorted((f["id"], f["stage"], f["error_type"]) for f in failures) == [("q1", "reflect", "KeyError"),
                                                                                 ("q9", "reflect", "KeyError")]
    assert any("vk-missing" in f["message"] for f in failures)


def test_resume_skips_done_shards_and_redoes_changed_ones(tmp_path, toy_dirs, video, monkeypatch):
    layout = write_run(str(tmp_path), video)
    config = ReflectConfig(judge=False)
    first = run(layout, config, toy_dirs["qwen2_vl"])
    real_loader = reflect.load_scorer
    monkeypatch.setattr(reflect, "load_scorer", lambda *a: pytest.fail("a done run must load no model"))
    assert run(layout, config, toy_dirs["qwen2_vl"]) == first
    # killed after writing shard 1 but before its manifest: only shard 1 is redone, no row is duplicated
    os.remove(io.manifest_uri(io.shard_uri(layout.scored, 1)))
    calls = []
    monkeypatch.setattr(reflect, "load_scorer", lambda *a: calls.append(1) or real_loader(*a))
    assert run(layout, config, toy_dirs["qwen2_vl"]) == first and calls == [1]
    assert io.read_dataset(layout.scored, schemas.SCORED).num_rows == 6
    # another config: every shard is rescored under the new hash
    changed = ReflectConfig(judge=False, prior_f1_weight=2.0)
    again = run(layout, changed, toy_dirs["qwen2_vl"])
    assert [m.content_hash for m in again] != [m.content_hash for m in first] and calls == [1, 1]
    table = io.read_dataset(layout.scored, schemas.SCORED)
    assert table.num_rows == 6
    assert set(table.column("config_hash").to_pylist()) == {reflect.stage_hash(changed, str(toy_dirs["qwen2_vl"]))}


def test_same_inputs_give_identical_scored_bytes(tmp_path, toy_dirs, video):
    layout = write_run(str(tmp_path), video)
    config = ReflectConfig(judge=False, sft_logp_weight=1.0)
    first = run(layout, config, toy_dirs["qwen2_vl"])
    other = RunLayout(str(tmp_path / "again"))
    second = reflect.run_reflect(layout.videos, layout.frames, layout.samples, other.scored,
                                 other.failures("reflect"), config, str(toy_dirs["qwen2_vl"]))
    assert [m.content_hash for m in first] == [m.content_hash for m in second]


def test_real_engine_judge_in_a_subprocess(tmp_path, toy_dirs, video):
    """The CLI with backend auto (vLLM here) judges every candidate; a random-weight model's replies are mostly
    gibberish, and whatever they are, each is recorded: raw text kept, status ok exactly where a rating parses."""
    layout = write_run(str(tmp_path), video, {0: SHARDS[0]})
    config_file = tmp_path / "reflect.json"
    config_file.write_text(json.dumps({"judge": True, "judge_max_tokens": 8, "backend": "auto"}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-m", "leanpo_core.reflect", "--config", str(config_file),
                           "--root", layout.root, "--model", str(toy_dirs["qwen2_vl"])],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "scored: 4 candidates in 1 shard(s)" in proc.stdout
    rows = io.read_dataset(layout.scored, schemas.SCORED).to_pylist()
    assert len(rows) == 4
    for row in rows:
        assert row["judge_raw"] is not None
        rating, status = reflect.judge_outcome(row["judge_raw"])
        assert (row["judge_status"], row["judge_score"]) == (status, rating)
        assert row["score"] == pytest.approx((rating or 0.0) + row["prior_f1"])
