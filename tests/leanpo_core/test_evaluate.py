"""Evaluation stage (leanpo_core.evaluate): the answer-match rule by hand, metric arithmetic on crafted responses,
preference accuracy against full-logit log-probs, a zero likelihood change against itself, and the CLI on vLLM.

The held-out set is three synthetic clips run through the real frames stage (4 frames, 64 px); the pairs table is
written here (two kept pairs, one dropped); the model is the toy Qwen2-VL.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leanpo_core import evaluate, io, schemas, stats, synthetic
from leanpo_core.config import EvaluateConfig, FramesConfig
from leanpo_core.frames import FrameStore, frames_metadata, run_frames
from leanpo_core.layout import RunLayout
from leanpo_core.logps import naive_response_logps
from leanpo_core.videos import read_videos, write_videos

REPO = Path(__file__).resolve().parents[2]
FAMILY = "qwen2_vl"


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """A run root with videos (5 test questions, 1 train), frames and pairs tables.

    Test rows: every question of clips 1-2 (synthetic, one-word answers) and clip 0's second question, turned into
    a free-form one (source "other", a sentence answer); clip 0's first question is in split "train".
    """
    tmp = tmp_path_factory.mktemp("heldout")
    manifest = synthetic.generate(tmp / "synthetic", num=3, seed=0, questions_per_clip=2)
    rows = read_videos(str(manifest))
    for i, row in enumerate(rows):
        row["split"] = "train" if i == 0 else "test"
    rows[1].update(source="other", answer=f"The answer is {rows[1]['answer']}.")
    layout = RunLayout(str(tmp / "run"))
    write_videos(rows, layout.videos)
    result = run_frames(layout.videos, layout.frames, layout.failures("frames"), FramesConfig(num_frames=4,
                        max_side=64), progress=False)
    assert result.failed == 0
    store = FrameStore(layout.frames)
    pairs = []
    for i, row in enumerate(rows[2:5]):
        key = store.key_for(row["video"])
        frame = store.rows[key]
        pairs.append({"pair_id": f"{row['id']}:0", "id": row["id"], "prompt": row["question"],
                      "chosen": f"It is {row['answer']}.", "rejected": "A purple triangle spins around.",
                      "video": row["video"], "video_key": key, "frames_uri": frame["shard_uri"],
                      "chosen_frame_indices": frame["frame_indices"], "rejected_frame_indices": frame["frame_indices"],
                      "chosen_score": 1.0, "rejected_score": 0.0, "chosen_gen_logp": -1.0, "rejected_gen_logp": -2.0,
                      "chosen_sft_logp": -1.0, "rejected_sft_logp": -2.0, "kept": i != 1,
                      "drop_reason": None if i != 1 else "untrustworthy", "model_revision": "toy", "round": 0,
                      "config_hash": "test"})
    io.write_table(pairs, layout.pairs, schemas.PAIRS)
    return layout, rows, pairs


@pytest.mark.parametrize("response, answer, expected", [
    ("Red.", "red", True),
    ("The moving shape is red.", "red", True),
    ("It moves to the LEFT!", "left", True),
    ("reddish", "red", False),
    ("There are 13 squares", "3", False),
    ("There are 3 squares", "3", True),
    ("a red big square", "red square", False),
    ("The red square.", "red square", True),
    ("red or blue", "red", True),
    ("blue", "red", False),
    ("", "red", False),
    ("", "", True),
])
def test_answer_match_on_crafted_strings(response, answer, expected):
    """The cases of `answer_match`'s docstring: normalised equality, or the answer as a whole-word phrase."""
    assert evaluate.answer_match(response, answer) is expected


def test_answer_and_preference_arithmetic_by_hand():
    """Two synthetic items ("red" answered "The shape is red." -> match; "3" answered "13" -> no match): accuracy
    1/2. One free-form item, answer "the red square moves left", response "a square moves left": after dropping
    articles, pred = [square, moves, left], ref = [red, square, moves, left], common 3, P = 1, R = 3/4,
    F1 = 2 * 1 * 0.75 / 1.75 = 6/7. rbar (chosen, rejected) = (-1, -2), (-3, -2.5): margins 1 and -0.5, accuracy 1/2,
    mean margin 0.25."""
    items = [{"id": "a", "question": "What colour is the moving shape?", "source": "synthetic", "answer": "red"},
             {"id": "b", "question": "How many squares are there?", "source": "synthetic", "answer": "3"},
             {"id": "c", "question": "What happens?", "source": "other", "answer": "The red square moves left."}]
    records = evaluate.answer_records("r", "m", "test", items, ["The shape is red.", "13", "A square moves left"],
                                      [])
    assert [r["correct"] for r in records] == [True, False, None]
    assert [r["category"] for r in records] == ["colour", "count", "other"]
    rows = evaluate.answer_rows("r", "m", "test", records, {})
    got = {r["metric"]: (r["value"], r["n"]) for r in rows}
    assert got["answer_accuracy"] == (0.5, 2)
    assert got["answer_accuracy/colour"] == (1.0, 1) and got["answer_accuracy/count"] == (0.0, 1)
    overall = next(r for r in rows if r["metric"] == "answer_accuracy")
    assert (overall["ci_low"], overall["ci_high"]) == pytest.approx(stats.wilson_interval(1, 2))
    assert got["answer_f1"][0] == pytest.approx(6 / 7) and got["answer_f1"][1] == 1
    # the change row pairs questions by id: the baseline got "a" wrong and "b" right -> delta 0, one each way
    baseline = [{**records[0], "correct": False}, {**records[1], "correct": True}, records[2]]
    change = evaluate.change_row("r", "m", "base", "test", records, baseline)
    assert (change["value"], change["n"]) == (0.0, 2)
    details = json.loads(change["details"])
    assert (details["gained"], details["lost"], details["p_value"]) == (1, 1, 1.0)
    rows = evaluate.preference_rows("r", "m", "test", [-1.0, -2.0, -3.0, -2.5], {})
    got = {r["metric"]: (r["value"], r["n"]) for r in rows}
    assert got == {"preference_accuracy": (0.5, 2), "preference_margin": (0.25, 2)}
    empty = evaluate.answer_rows("r", "m", "test", [], {})
    assert all(math.isnan(r["value"]) and r["n"] == 0 for r in empty)


def naive_rbar(loaded_model, clip, frame_row, question, response) -> float:
    """rbar from full-sequence logits of one unbatched sequence: the independent reference for the lean path."""
    model, processor, adapter = loaded_model
    inputs = adapter.encode(processor, clip, adapter.build_prompt(processor, question), response,
                            meta=frames_metadata(frame_row, clip), add_end=True)
    with torch.no_grad():
        total, count = naive_response_logps(model(**inputs).logits, inputs["labels"])
    return total.item() / count.item()


def test_evaluate_in_process_against_itself(heldout, toy_dirs, loaded):
    """Transformers backend, baseline = the model: schema-valid table, every metric, counts from the held-out set,
    preference metrics equal to full-logit log-probs of the two kept pairs, and a likelihood change of exactly 0."""
    layout, rows, pairs = heldout
    model = str(toy_dirs[FAMILY])
    out = layout.evaluation("self")
    config = EvaluateConfig(backend="transformers", max_new_tokens=6, batch_size=2)
    manifest = evaluate.run_evaluate(model, layout.videos, layout.frames, layout.pairs, out, config, "self",
                                     baseline_model=model)
    table = io.read_table(out, schemas.EVALUATION)  # raises unless schema-valid at the declared version
    got = {(r["model"], r["metric"]): r for r in table.to_pylist()}
    per_type = {m for _, m in got if m.startswith("answer_accuracy/")}
    # 5 metrics per model, per-type accuracy per model, and the two changes
    assert manifest.rows == table.num_rows == 12 + 2 * len(per_type) and per_type
    assert {m for _, m in got} - per_type == set(evaluate.METRICS)
    change = got[(model, "answer_accuracy_change")]  # the model against itself: no question changes
    assert (change["value"], change["ci_low"], change["ci_high"], change["n"]) == (0.0, 0.0, 0.0, 4)
    answers = io.read_table(evaluate.answers_uri(out), schemas.ANSWERS).to_pylist()
    assert len(answers) == 2 * 5 and {a["model"] for a in answers} == {model}
    assert sum(a["correct"] for a in answers if a["correct"] is not None) == 2 * round(
        4 * got[(model, "answer_accuracy")]["value"])
    mine = {metric: row for (who, metric), row in got.items() if who == model}
    assert mine["answer_logp_change"]["value"] == 0.0 and mine["answer_logp_change"]["n"] == 5
    assert json.loads(mine["answer_logp_change"]["details"])["baseline"] == model
    assert mine["answer_accuracy"]["n"] == 4 and mine["answer_f1"]["n"] == 1 and mine["answer_logp"]["n"] == 5
    assert 0.0 <= mine["answer_accuracy"]["value"] <= 1.0 and 0.0 <= mine["answer_f1"]["value"] <= 1.0
    assert mine["answer_logp"]["value"] < 0 and mine["answer_logp"]["split"] == "test"

    store = FrameStore(layout.frames)
    margins = []
    for pair in (p for p in pairs if p["kept"]):
        clip, frame_row = store.load([pair["video_key"]])[pair["video_key"]]
        chosen, rejected = (naive_rbar(loaded(FAMILY), clip, frame_row, pair["prompt"], pair[side])
                            for side in ("chosen", "rejected"))
        margins.append(chosen - rejected)
    assert mine["preference_accuracy"]["n"] == 2 and mine["preference_accuracy"]["split"] == "test"
    assert mine["preference_accuracy"]["value"] == sum(m > 0 for m in margins) / 2
    assert mine["preference_margin"]["value"] == pytest.approx(sum(margins) / 2, abs=1e-5)

    report = Path(evaluate.report_uri(out)).read_text()
    assert out.endswith(".parquet") and evaluate.report_uri(out).endswith("self.md")
    assert all(f"| {metric} |" in report for metric in evaluate.METRICS)


def test_cli_with_vllm_writes_table_and_report(heldout, toy_dirs, tmp_path):
    """`python -m leanpo_core.evaluate` on the run root with vLLM generating: the table and the markdown report."""
    layout, _, _ = heldout
    config = tmp_path / "evaluate.json"
    config.write_text(EvaluateConfig(backend="vllm", max_new_tokens=6, max_model_len=1024).model_dump_json())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    out = str(tmp_path / "eval" / "cli.parquet")
    proc = subprocess.run([sys.executable, "-m", "leanpo_core.evaluate", "--model", str(toy_dirs[FAMILY]),
                           "--root", layout.root, "--config", str(config), "--run-id", "cli", "--out", out],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = io.read_table(out, schemas.EVALUATION).to_pylist()
    assert f"evaluation: {len(table)} rows -> {out}" in proc.stdout
    assert {r["metric"] for r in table if "/" not in r["metric"]} == set(evaluate.METRICS) - {
        "answer_logp_change", "answer_accuracy_change"}
    assert {r["run_id"] for r in table} == {"cli"}
    accuracy = next(r for r in table if r["metric"] == "answer_accuracy")
    assert accuracy["n"] == 4 and 0.0 <= accuracy["value"] <= 1.0
    report = (tmp_path / "eval" / "cli.md").read_text()
    assert "# Evaluation `cli`" in report and "| answer_accuracy | test |" in report


def test_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(option in text for option in ("--model", "--baseline", "--root", "--out", "--config", "--run-id",
                                             "answer_logp_change"))


def test_config_rejects_no_room_for_a_prompt():
    with pytest.raises(ValueError, match="max_model_len"):
        EvaluateConfig(max_new_tokens=512, max_model_len=512)
