"""Pairs stage (leanpo_core.pairs): selection, every drop reason, the trust filter, determinism, and the paper's
K = 1 construction reproduced end to end (samples -> reflect -> pairs) on the S3 server."""

from __future__ import annotations

import math

import pytest
import torch

from leanpo_core import io, pairs, reflect, schemas
from leanpo_core.config import PairsConfig, ReflectConfig
from leanpo_core.layout import RunLayout
from leanpo_core.logps import naive_response_logps
from leanpo_core.pairdata import PairsDataset
from tests.leanpo_core.test_reflect import QUESTIONS, clips, naive_mean_logp, run, write_run

VIDEOS = {q: {"video": f"{q}.mp4", "question": qa[0]} for q, qa in QUESTIONS.items()}
FRAMES = {"vk-a": {"shard_uri": "/run/frames/part-00000.parquet", "frame_indices": [1, 4, 7]}}


def scored(qid: str, side: str, candidate: int, score: float, sft: float, round_: int = 0) -> dict:
    return {"id": qid, "video_key": "vk-a", "side": side, "candidate": candidate, "round": round_,
            "response": f"{qid} {side} {candidate}", "finish_reason": "length" if candidate == 1 else "stop",
            "judge_score": None, "judge_raw": None, "judge_status": "off",
            "prior_f1": 0.0, "sft_mean_logprob": sft, "sft_num_tokens": 5, "gen_mean_logprob": -1.0 - candidate,
            "score": score, "rank": -1, "model_revision": "toy-rev", "config_hash": "reflect-test"}


def ranked(*rows: dict) -> list[dict]:
    rows = [dict(r) for r in rows]
    reflect.assign_ranks(rows)
    return rows


def by_id(rows: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in rows}


def test_chosen_is_best_winner_and_rejected_is_worst_loser():
    rows = ranked(scored("q1", "win", 0, 0.2, -1.5), scored("q1", "win", 1, 0.9, -1.0),
                  scored("q1", "win", 2, 0.5, -0.1), scored("q1", "lose", 0, 0.1, -0.2),
                  scored("q1", "lose", 1, -0.3, -2.0), scored("q1", "lose", 2, 0.4, -3.0))
    [pair] = pairs.select_pairs(rows, VIDEOS, FRAMES, PairsConfig())
    assert (pair["chosen"], pair["rejected"]) == ("q1 win 1", "q1 lose 1")
    assert (pair["chosen_score"], pair["rejected_score"]) == (0.9, -0.3)
    assert (pair["chosen_sft_logp"], pair["rejected_sft_logp"]) == (-1.0, -2.0)
    assert (pair["chosen_gen_logp"], pair["rejected_gen_logp"]) == (-2.0, -2.0)
    assert (pair["chosen_finish_reason"], pair["rejected_finish_reason"]) == ("length", "length")
    assert pair["kept"] and pair["drop_reason"] is None
    assert pair["prompt"] == QUESTIONS["q1"][0] and pair["video"] == "q1.mp4" and pair["video_key"] == "vk-a"
    assert pair["frames_uri"] == FRAMES["vk-a"]["shard_uri"]
    assert pair["chosen_frame_indices"] == pair["rejected_frame_indices"] == [1, 4, 7]
    assert (pair["pair_id"], pair["round"], pair["model_revision"]) == ("q1:0", 0, "toy-rev")
    assert pair["config_hash"] == PairsConfig().config_hash()


REASON_ROWS = ranked(
    scored("a", "win", 0, 1.0, -1.0), scored("a", "lose", 0, 0.0, -2.0),   # kept
    scored("b", "win", 0, 0.55, -1.0), scored("b", "lose", 0, 0.5, -2.0),  # margin 0.05 < 0.1
    scored("c", "win", 0, 1.0, -2.1), scored("c", "lose", 0, 0.0, -2.0),   # rbar gap -0.1: untrustworthy
    scored("d", "lose", 0, 0.0, -2.0),                                      # no winning candidate
    scored("e", "win", 0, 1.0, -1.0),                                       # no losing candidate
    scored("f", "win", 0, 1.0, -2.0), scored("f", "lose", 0, 0.0, -2.0),   # gap exactly 0: not > 0
    scored("g", "win", 0, 0.0, -3.0), scored("g", "lose", 0, 0.0, -2.0),   # fails both: margin is checked first
)
VIDEOS_ALL = {q: {"video": f"{q}.mp4", "question": f"question {q}"} for q in "abcdefg"}


def test_every_drop_reason_is_a_row():
    got = by_id(pairs.select_pairs(REASON_ROWS, VIDEOS_ALL, FRAMES, PairsConfig(min_score_margin=0.1)))
    assert {q: got[q]["drop_reason"] for q in got} == {
        "a": None, "b": "score_margin", "c": "untrustworthy", "d": "no_win_candidate", "e": "no_lose_candidate",
        "f": "untrustworthy", "g": "score_margin"}
    assert [q for q in got if got[q]["kept"]] == ["a"]
    d = got["d"]
    assert d["chosen"] == "" and d["chosen_score"] is None and d["chosen_sft_logp"] is None
    assert math.isnan(d["chosen_gen_logp"]) and d["rejected"] == "d lose 0"
    assert (d["chosen_finish_reason"], d["rejected_finish_reason"]) == (None, "stop")
    assert got["e"]["rejected"] == "" and got["e"]["rejected_score"] is None
    assert list(got) == sorted(got)


def test_trust_filter_off_keeps_untrustworthy_pairs():
    got = by_id(pairs.select_pairs(REASON_ROWS, VIDEOS_ALL, FRAMES, PairsConfig(trust_filter=False)))
    assert {q for q in got if got[q]["kept"]} == {"a", "b", "c", "f", "g"}


def test_defaults_filter_on_trust_only_and_min_trust_gap_raises_the_bar():
    """Default: no score filter (b's small margin does not matter), keep iff the rbar gap is > 0 (a, b: 1.0; c: -0.1,
    f: 0, g: -1 are untrustworthy). With min_trust_gap 0.5 a gap of 0.3 is untrustworthy too."""
    got = by_id(pairs.select_pairs(REASON_ROWS, VIDEOS_ALL, FRAMES, PairsConfig()))
    assert {q for q in got if got[q]["kept"]} == {"a", "b"}
    rows = ranked(scored("h", "win", 0, 1.0, -1.7), scored("h", "lose", 0, 0.0, -2.0))
    [pair] = pairs.select_pairs(rows, {"h": VIDEOS_ALL["a"]}, FRAMES, PairsConfig(min_trust_gap=0.5))
    assert pair["drop_reason"] == "untrustworthy"


def test_inconsistent_inputs_fail_loudly():
    split = [{**r, "rank": 0} for r in ranked(scored("a", "win", 0, 1.0, -1.0), scored("a", "win", 1, 0.5, -1.0))]
    with pytest.raises(ValueError, match="split across samples shards"):
        pairs.select_pairs(split, VIDEOS_ALL, FRAMES, PairsConfig())
    with pytest.raises(ValueError, match="not in the videos table"):
        pairs.select_pairs(ranked(scored("zz", "win", 0, 1.0, -1.0)), VIDEOS_ALL, FRAMES, PairsConfig())
    with pytest.raises(ValueError, match="not in the frames table"):
        pairs.select_pairs(ranked(scored("a", "win", 0, 1.0, -1.0)), VIDEOS_ALL, {}, PairsConfig())


def test_run_pairs_is_deterministic_and_sorted(tmp_path, video, capsys):
    layout = write_run(str(tmp_path), video, shards={})
    rows = ranked(*REASON_ROWS)
    for row in rows:
        row["id"] = {"a": "q1", "c": "q2", "e": "q3"}.get(row["id"], row["id"])
    keep = [r for r in rows if r["id"] in QUESTIONS]
    io.write_shard([r for r in keep if r["id"] != "q1"], layout.scored, schemas.SCORED, 0)  # out of id order
    io.write_shard([r for r in keep if r["id"] == "q1"], layout.scored, schemas.SCORED, 1)
    first = pairs.run_pairs(layout.videos, layout.frames, layout.scored, layout.pairs, PairsConfig())
    second = pairs.run_pairs(layout.videos, layout.frames, layout.scored, str(tmp_path / "p2.parquet"),
                             PairsConfig())
    assert first.content_hash == second.content_hash and first.rows == 3
    table = io.read_table(layout.pairs, schemas.PAIRS).to_pylist()
    assert [r["id"] for r in table] == ["q1", "q2", "q3"]
    assert [r["drop_reason"] for r in table] == [None, "untrustworthy", "no_lose_candidate"]
    assert table[0]["frames_uri"] == io.shard_uri(layout.frames, 0)
    assert table[0]["chosen_frame_indices"] == clips(video)["vk-a"][1]
    assert pairs.main(["--root", layout.root]).content_hash == first.content_hash
    assert "pairs: 3 rows (kept 1, no_lose_candidate 1, untrustworthy 1)" in capsys.readouterr().out


def test_k1_reproduces_the_papers_pair_construction_on_s3(s3_root, toy_dirs, video, loaded):
    """K = 1, judge off, default pairs config: chosen = y_w, rejected = y_l, kept iff rbar_SFT(y_w) > rbar_SFT(y_l),
    with rbar computed here independently from full logits on the clean frames and the plain question. q1 and q3
    share clip and question with their responses swapped, so exactly one of them is kept."""
    a, b = "A red square moves left.", "A blue circle moves up and away."
    shards = {0: [("q1", "win", 0, a, "stop"), ("q1", "lose", 0, b, "stop"),
                  ("q3", "win", 0, b, "stop"), ("q3", "lose", 0, a, "stop")],
              1: [("q2", "win", 0, "The square is red.", "stop"), ("q2", "lose", 0, "green green", "length")]}
    layout = write_run(s3_root, video, shards)
    run(layout, ReflectConfig(judge=False), toy_dirs["qwen2_vl"])
    pairs.run_pairs(layout.videos, layout.frames, layout.scored, layout.pairs, PairsConfig())
    got = by_id(io.read_table(layout.pairs, schemas.PAIRS).to_pylist())
    assert list(got) == ["q1", "q2", "q3"]
    candidates = [row for rows in shards.values() for row in rows]
    for qid in got:
        (_, _, _, y_w, end_w), (_, _, _, y_l, end_l) = [row for row in candidates if row[0] == qid]
        frames, indices = clips(video)[{"q2": "vk-b"}.get(qid, "vk-a")]
        question = QUESTIONS[qid][0]
        r_w, _ = naive_mean_logp(loaded("qwen2_vl"), frames, indices, question, y_w, add_end=end_w != "length")
        r_l, _ = naive_mean_logp(loaded("qwen2_vl"), frames, indices, question, y_l, add_end=end_l != "length")
        pair = got[qid]
        assert (pair["chosen"], pair["rejected"], pair["prompt"]) == (y_w, y_l, question)
        assert pair["chosen_sft_logp"] == pytest.approx(r_w, abs=1e-5)
        assert pair["rejected_sft_logp"] == pytest.approx(r_l, abs=1e-5)
        assert pair["kept"] == (r_w > r_l)
        assert pair["drop_reason"] == (None if r_w > r_l else "untrustworthy")
    assert got["q1"]["kept"] != got["q3"]["kept"]
    assert got["q1"]["frames_uri"] == io.shard_uri(RunLayout(s3_root).frames, 0)
    assert (got["q2"]["chosen_finish_reason"], got["q2"]["rejected_finish_reason"]) == ("stop", "length")
    # The trainer encodes each kept pair by the same end-token rule, so under the SFT model its log-probs are the
    # stored ones: displacement (now minus the stored baseline) starts at zero, the truncated q2 reply included.
    every = layout.root + "/all-pairs.parquet"  # the filter off: every pair kept, so every pair is trained
    pairs.run_pairs(layout.videos, layout.frames, layout.scored, every, PairsConfig(trust_filter=False))
    model, processor, adapter = loaded("qwen2_vl")
    dataset = PairsDataset(every, layout.frames, processor, adapter, max_length=4096)
    assert [row["id"] for row in dataset.rows] == ["q1", "q2", "q3"]
    for index, row in enumerate(dataset.rows):
        item = dataset[index]
        for side in ("chosen", "rejected"):
            with torch.no_grad():
                total, count = naive_response_logps(model(**item[side]).logits, item[side]["labels"])
            assert (total / count).item() - item[f"{side}_baseline"] == pytest.approx(0.0, abs=1e-5)
    assert io.read_dataset(layout.scored, schemas.SCORED).num_rows == 6
