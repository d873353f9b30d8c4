"""Standard benchmarks (leanpo_core.benchmarks): Video-MME, MVBench and NExT-QA folders in their published layouts,
built small from synthetic clips (real h264 files), read back; the prompts as lmms-eval asks them; hand-made
replies scored to hand-worked accuracies per category, malformed ones counted wrong; and the whole path through the
evaluate stage's CLI (frames stage, vLLM with the toy Qwen2-VL, letter extraction, per-category rows).

With lmms-eval installed in its own venv (bench/.cache/lmms-venv, `pip install lmms-eval==0.7.3`), a slow test
checks that lmms-eval's own functions ask the same prompts and score the same replies the same way.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leanpo_core import benchmarks, evaluate, io, schemas, stats, synthetic
from leanpo_core.config import EvaluateConfig

REPO = Path(__file__).resolve().parents[2]
LMMS_PYTHON = REPO / "bench" / ".cache" / "lmms-venv" / "bin" / "python"
COLOURS = ["red", "green", "blue", "yellow"]

# Video-MME rows: (question_id, videoID, duration, domain, task_type, answer letter); two questions per video.
VIDEOMME = [("001-1", "vidA", "short", "Knowledge", "Counting Problem", "A"),
            ("001-2", "vidA", "short", "Knowledge", "Attribute Perception", "B"),
            ("002-1", "vidB", "medium", "Sports Competition", "Counting Problem", "C"),
            ("002-2", "vidB", "medium", "Sports Competition", "Attribute Perception", "D"),
            ("003-1", "vidC", "long", "Knowledge", "Counting Problem", "A"),
            ("003-2", "vidC", "long", "Sports Competition", "Attribute Perception", "B")]


def _clips(folder: Path, count: int) -> list[Path]:
    """`count` synthetic clips (24 frames, 96x72, h264)."""
    return [synthetic.write_clip(synthetic.render_clip(synthetic.scene(7, i)[0]), folder / f"clip{i}.mp4")
            for i in range(count)]


def _place(clip: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(clip, path)


def _options(answer: str) -> list[str]:
    """Four colours, the right one at `answer`'s letter."""
    right = "ABCD".index(answer)
    return [COLOURS[(i - right) % 4] for i in range(4)]


def videomme_docs() -> list[dict]:
    return [{"video_id": qid[:3], "duration": duration, "domain": domain, "sub_category": "Astronomy",
             "url": f"https://www.youtube.com/watch?v={video}", "videoID": video, "question_id": qid,
             "task_type": task, "question": f"What colour is shape {qid}?",
             "options": [f"{'ABCD'[i]}. {o}" for i, o in enumerate(_options(answer))], "answer": answer}
            for qid, video, duration, domain, task, answer in VIDEOMME]


def mvbench_docs() -> dict[str, list[dict]]:
    """Two published tasks (clevrer videos) and one row whose answer is none of its candidates."""
    def doc(video, answer, task):
        candidates = _options(answer)
        return {"video": video, "question": f"Which colour ({task})?", "candidates": candidates,
                "answer": candidates["ABCD".index(answer)]}
    return {"moving_direction": [doc("video_00001.mp4", "B", "md"), doc("video_00002.mp4", "A", "md")],
            "object_existence": [doc("video_00001.mp4", "C", "oe"), doc("video_00003.mp4", "A", "oe"),
                                 {"video": "video_00003.mp4", "question": "?", "candidates": ["x", "y"],
                                  "answer": "z"}]}


NEXTQA = [  # (video, qid, type, answer index)
    ("4010069381", 0, "CW", 2), ("4010069381", 1, "TN", 0), ("5333075105", 0, "DC", 1), ("5333075105", 3, "CH", 3)]
NEXTQA_OPTIONS = ["the circle moves left", "the square stops", "it turns blue", "the boy laughs", "nothing"]


def nextqa_docs() -> list[dict]:
    return [{"video": video, "frame_count": 24, "width": 96, "height": 72, "question": f"why {qid} ",
             "answer": answer, "qid": qid, "type": kind, **{f"a{i}": o for i, o in enumerate(NEXTQA_OPTIONS)}}
            for video, qid, kind, answer in NEXTQA]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """One benchmark folder per layout, in the published shape:
        videomme/videomme/test-00000-of-00001.parquet, videomme/data/<videoID>.mp4
        mvbench/json/<task>.json, mvbench/video/clevrer/video_validation/<video> (video_00002.mp4 is missing)
        nextqa/nextqa/{train,test}.csv, nextqa/nextqa/map_vid_vidorID.json, nextqa/NExTVideo/<dir>/<vidorID>.mp4
    """
    tmp = tmp_path_factory.mktemp("benchmarks")
    clips = _clips(tmp / "clips", 3)
    root = tmp / "videomme"
    (root / "videomme").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(videomme_docs()), root / "videomme" / "test-00000-of-00001.parquet")
    for clip, video in zip(clips, ("vidA", "vidB", "vidC")):
        _place(clip, root / "data" / f"{video}.mp4")
    root = tmp / "mvbench"
    for task, docs in mvbench_docs().items():
        (root / "json").mkdir(parents=True, exist_ok=True)
        (root / "json" / f"{task}.json").write_text(json.dumps(docs))
    for clip, video in zip(clips, ("video_00001.mp4", "video_00003.mp4")):
        _place(clip, root / "video" / "clevrer" / "video_validation" / video)
    root = tmp / "nextqa"
    (root / "nextqa").mkdir(parents=True)
    for name, docs in (("test.csv", nextqa_docs()), ("train.csv", nextqa_docs()[:1])):
        with open(root / "nextqa" / name, "w", newline="") as f:
            writer = csv.DictWriter(f, list(docs[0]))
            writer.writeheader()
            writer.writerows(docs)
    (root / "nextqa" / "map_vid_vidorID.json").write_text(json.dumps({"4010069381": "1001/4010069381",
                                                                      "5333075105": "1002/5333075105"}))
    for clip, video in zip(clips, ("1001/4010069381", "1002/5333075105")):
        _place(clip, root / "NExTVideo" / f"{video}.mp4")
    return {"videomme": tmp / "videomme", "mvbench": tmp / "mvbench", "nextqa": tmp / "nextqa"}


def _accuracies(name: str, records: list[dict]) -> dict[str, tuple[float, int]]:
    return {key: (s["value"], s["n"]) for key, s in benchmarks.summarize(name, records).items()}


@pytest.mark.parametrize("reply, letter", [
    ("C", "C"), ("The answer is (B).", "B"), ("A. the red one", "A"), ("I think (A), no, (C)", "C"),
    ("Best option: C", "C"), ("Based on the video", "B"), ("no idea", None), ("", None), ("   ", None)])
def test_videomme_letter_worked_cases(reply, letter):
    assert benchmarks.videomme_letter(reply) == letter


@pytest.mark.parametrize("reply, letter", [
    ("(B) the man jumps", "B"), ("c. sitting down", "C"), ("It is a cat", "A"), ("Option D", "D"),
    ("sitting", None), ("", None)])
def test_mvbench_letter_worked_cases(reply, letter):
    assert benchmarks.mvbench_letter(reply) == letter


@pytest.mark.parametrize("reply, letter", [
    ("(C)", "C"), ("B", "B"), ("A or B", "B"), ("the boy wants it because the square stops there", "B"),
    ("maybe", None), ("", None)])
def test_nextqa_letter_worked_cases(reply, letter):
    assert benchmarks.nextqa_letter(reply, NEXTQA_OPTIONS) == letter


def test_videomme_layout_scores_hand_made_replies(folders):
    """Six questions, replies right (q1 "A", q3 "C. red", q6 "I pick B"), wrong (q2 "(C)" for B) and malformed (q4
    "no idea", q5 ""): 3/6 overall; duration short 1/2, medium 1/2, long 1/2; domain Knowledge (q1, q2, q5) 1/3,
    Sports Competition (q3, q4, q6) 2/3; task Counting Problem (q1, q3, q5) 2/3, Attribute Perception 1/3."""
    questions, counts = benchmarks.read_benchmark(str(folders["videomme"]), "videomme")
    assert [q.id for q in questions] == [row[0] for row in VIDEOMME]
    assert counts == {"questions": 6, "invalid": 0, "invalid_examples": [], "missing_video": 0}
    assert questions[2].video == str(folders["videomme"] / "data" / "vidB.mp4")
    assert questions[0].prompt == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\nWhat colour is shape 001-1?\n"
        "A. red\nB. green\nC. blue\nD. yellow\n\nAnswer with the option's letter from the given choices directly.")
    assert questions[0].categories == {"duration": "short", "domain": "Knowledge", "task_type": "Counting Problem"}
    replies = ["A", "The answer is (C).", "C. red", "no idea", "", "I pick B"]
    records = benchmarks.score("videomme", questions, replies)
    assert [r["extracted"] for r in records] == ["A", "C", "C", None, None, "B"]
    assert [r["correct"] for r in records] == [True, False, True, False, False, True]
    got = _accuracies("videomme", records)
    assert got == {"all": (0.5, 6), "duration=long": (0.5, 2), "duration=medium": (0.5, 2),
                   "duration=short": (0.5, 2), "domain=Knowledge": (1 / 3, 3), "domain=Sports Competition": (2 / 3, 3),
                   "task_type=Attribute Perception": (1 / 3, 3), "task_type=Counting Problem": (2 / 3, 3)}
    overall = benchmarks.summarize("videomme", records)["all"]
    assert (overall["ci_low"], overall["ci_high"]) == pytest.approx(stats.wilson_interval(3, 6))


def test_videomme_json_at_the_top_and_a_missing_video(tmp_path, folders):
    """The question table may be a JSON list at the folder's top; a question whose video is absent is counted."""
    docs = videomme_docs()[:2] + [{**videomme_docs()[2], "videoID": "gone"}]
    (tmp_path / "questions.json").write_text(json.dumps(docs))
    _place(folders["videomme"] / "data" / "vidA.mp4", tmp_path / "data" / "vidA.MP4")
    questions, counts = benchmarks.read_benchmark(str(tmp_path), "videomme")
    assert [q.video.rsplit("/", 1)[-1] for q in questions] == ["vidA.MP4", "vidA.MP4", ""]
    assert counts["missing_video"] == 1 and counts["invalid"] == 0


def test_mvbench_layout_scores_hand_made_replies(folders):
    """Four valid questions (the fifth row's answer is none of its candidates: invalid) in two tasks; the second
    moving_direction video is missing. Replies: md0 "(B) left" right, md1 "It is a cat" (the article reads as A)
    right, oe0 "sitting" malformed, oe1 "Option B" for A wrong: moving_direction 2/2, object_existence 0/2, all 2/4."""
    questions, counts = benchmarks.read_benchmark(str(folders["mvbench"]), "mvbench")
    assert [q.id for q in questions] == ["moving_direction/0", "moving_direction/1", "object_existence/0",
                                         "object_existence/1"]
    assert counts["invalid"] == 1 and counts["missing_video"] == 1 and counts["questions"] == 5
    assert questions[0].video == str(folders["mvbench"] / "video/clevrer/video_validation/video_00001.mp4")
    assert questions[1].video == ""
    assert questions[0].prompt == ("Question:Which colour (md)?\nOption:\n(A) yellow\n(B) red\n(C) green\n(D) blue\n"
                                   "Only give the best option.\n")
    assert [q.answer for q in questions] == ["B", "A", "C", "A"]
    records = benchmarks.score("mvbench", questions, ["(B) left", "It is a cat", "sitting", "Option B"])
    assert [r["extracted"] for r in records] == ["B", "A", None, "B"]
    assert _accuracies("mvbench", records) == {"all": (0.5, 4), "task=moving_direction": (1.0, 2),
                                               "task=object_existence": (0.0, 2)}


def test_nextqa_layout_scores_hand_made_replies(folders):
    """test.csv is read (train.csv is not); videos found through map_vid_vidorID.json. Replies: CW "(C)" right
    (answer 2), TN "maybe" malformed, DC a sentence holding option B's text right (answer 1), CH "A or B" wrong
    (answer D): all 2/4; type CW 1/1, TN 0/1, DC 1/1, CH 0/1; group causal 1/2, temporal 0/1, descriptive 1/1."""
    questions, counts = benchmarks.read_benchmark(str(folders["nextqa"]), "nextqa")
    assert [q.id for q in questions] == ["4010069381_0", "4010069381_1", "5333075105_0", "5333075105_3"]
    assert counts["missing_video"] == 0 and counts["questions"] == 4
    assert questions[0].video == str(folders["nextqa"] / "NExTVideo/1001/4010069381.mp4")
    assert questions[0].prompt == ("why 0\nA. the circle moves left\nB. the square stops\nC. it turns blue\n"
                                   "D. the boy laughs\nE. nothing")
    replies = ["(C)", "maybe", "I think that the square stops in the end", "A or B"]
    records = benchmarks.score("nextqa", questions, replies)
    assert [r["extracted"] for r in records] == ["C", None, "B", "B"]
    assert _accuracies("nextqa", records) == {
        "all": (0.5, 4), "type=CH": (0.0, 1), "type=CW": (1.0, 1), "type=DC": (1.0, 1), "type=TN": (0.0, 1),
        "group=causal": (0.5, 2), "group=descriptive": (1.0, 1), "group=temporal": (0.0, 1)}


def test_a_copy_on_s3_reads_and_decodes_alike(folders, s3_root):
    """The MVBench folder copied to S3: the same questions, videos named by their s3:// URIs, and `prepare` decodes
    them from S3 through the frames stage into frames kept on S3 (2 frames each); the missing video stays counted."""
    fs, path = io.filesystem(s3_root)
    fs.put(str(folders["mvbench"]) + "/", path + "/mvbench", recursive=True)
    root = io.join_uri(s3_root, "mvbench")
    questions, counts = benchmarks.read_benchmark(root, "mvbench")
    local, local_counts = benchmarks.read_benchmark(str(folders["mvbench"]), "mvbench")
    assert [(q.id, q.prompt, q.answer) for q in questions] == [(q.id, q.prompt, q.answer) for q in local]
    assert counts == local_counts
    assert questions[0].video == f"{root}/video/clevrer/video_validation/video_00001.mp4"
    bench = benchmarks.prepare(root, "mvbench", 2, 0, io.join_uri(s3_root, "frames"))
    assert [q.id for q in bench.questions] == ["moving_direction/0", "object_existence/0", "object_existence/1"]
    assert (bench.counts["asked"], bench.counts["missing_video"], bench.counts["undecodable"]) == (4, 1, 0)
    [batch] = list(bench.items())
    assert [item["frames"].shape for item in batch] == [(2, 72, 96, 3)] * 3


def test_spread_keeps_every_part_of_the_file():
    """A cap takes evenly spaced questions, first and last included, not the file's head."""
    questions = [benchmarks.Question(str(i), "", "", (), "A") for i in range(10)]
    assert [q.id for q in benchmarks.spread(questions, 4)] == ["0", "3", "6", "9"]
    assert benchmarks.spread(questions, 0) == questions


def test_config_needs_a_layout_for_a_benchmark():
    with pytest.raises(ValueError, match="benchmark_layout"):
        EvaluateConfig(benchmark="/data/videomme")
    assert EvaluateConfig(benchmark="/data/videomme", benchmark_layout="videomme").benchmark_num_frames == 16


def test_benchmark_rows_change_and_report_by_hand():
    """MVBench records of a model (md0 right, md1 wrong, oe0 malformed) and a baseline (md0 wrong, md1 wrong, oe0
    right): model accuracy 1/3, moving_direction 1/2, object_existence 0/1, malformed 1; prompt tokens 100, 101,
    102: 101 per question. The change pairs questions by id: model [1, 0, 0] minus baseline [0, 0, 1] is
    [+1, 0, -1], mean 0, one question gained and one lost. The report lists the benchmark's rows after the held-out
    ones."""
    bench = benchmarks.Prepared(benchmarks.layout("mvbench"), "/data/mvbench", [], None,
                                {"questions": 4, "invalid": 1, "invalid_examples": [], "missing_video": 0, "asked": 3,
                                 "undecodable": 0, "frames_uri": "x"})

    def records(correct: list[bool], extracted: list[str | None]) -> list[dict]:
        return [{"id": f"{task}/{i}", "categories": json.dumps({"task": task}), "correct": ok, "extracted": letter,
                 "frames": 8, "prompt_tokens": 100 + n, "reply_tokens": 2}
                for n, ((task, i), ok, letter) in enumerate(zip([("moving_direction", 0), ("moving_direction", 1),
                                                  ("object_existence", 0)], correct, extracted))]

    mine, theirs = records([True, False, False], ["B", "C", None]), records([False, False, True], ["A", "C", "C"])
    rows = evaluate.benchmark_rows("r", "m", bench, mine)
    got = {r["metric"]: (r["value"], r["n"], r["split"]) for r in rows}
    assert got == {"mvbench_accuracy": (1 / 3, 3, "mvbench"),
                   "mvbench_accuracy/task=moving_direction": (0.5, 2, "mvbench"),
                   "mvbench_accuracy/task=object_existence": (0.0, 1, "mvbench")}
    details = json.loads(rows[0]["details"])
    assert (details["malformed"], details["invalid"], details["asked"]) == (1, 1, 3)
    assert (details["frames_per_question"], details["prompt_tokens_per_question"]) == (8.0, 101.0)
    assert (rows[0]["ci_low"], rows[0]["ci_high"]) == pytest.approx(stats.wilson_interval(1, 3))
    change = evaluate.change_row("r", "m", "base", "mvbench", mine, theirs, "mvbench_accuracy_change")
    assert (change["metric"], change["value"], change["n"]) == ("mvbench_accuracy_change", 0.0, 3)
    assert (json.loads(change["details"])["gained"], json.loads(change["details"])["lost"]) == (1, 1)
    rows += evaluate.benchmark_rows("r", "base", bench, theirs) + [change]
    held_out = evaluate.answer_rows("r", "m", "test", [], {})
    text = evaluate.report(held_out + rows, "m", "base", "r").splitlines()
    assert text.index("| answer_accuracy | test | n/a |  |") < text.index(
        "| mvbench_accuracy | mvbench | 0.333 [0.061, 0.792] (n=3) | 0.333 [0.061, 0.792] (n=3) |")
    assert any(line.startswith("mvbench_accuracy: MVBench prompt and letter reading of lmms-eval 0.7.3") and
               "(1 of 3)" in line for line in text)


def test_evaluate_cli_answers_the_benchmark_with_vllm(folders, toy_dirs, tmp_path):
    """`python -m leanpo_core.evaluate` with `benchmark` set, the toy Qwen2-VL on vLLM: the frames
    stage decodes the benchmark's videos (4 frames each) beside the table, every question is asked, each reply's
    letter is read by Video-MME's rule (the toy's replies are mostly malformed: counted wrong), and the accuracy rows
    (overall, per duration, domain and task type) equal the answers table's; the held-out split has no question."""
    run = tmp_path / "run"
    io.write_table([{"id": "x", "video": "none.mp4", "question": "q", "answer": "a", "split": "train"}],
                   str(run / "videos.parquet"), schemas.VIDEOS)
    config = tmp_path / "evaluate.json"
    config.write_text(EvaluateConfig(backend="vllm", max_new_tokens=6, max_model_len=1024,
                                     benchmark=str(folders["videomme"]), benchmark_layout="videomme",
                                     benchmark_num_frames=4).model_dump_json())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    out = str(tmp_path / "eval" / "bench.parquet")
    model = str(toy_dirs["qwen2_vl"])
    proc = subprocess.run([sys.executable, "-m", "leanpo_core.evaluate", "--model", model, "--videos",
                           str(run / "videos.parquet"), "--frames", str(run / "frames"), "--config", str(config),
                           "--run-id", "bench", "--out", out],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = {(r["model"], r["metric"]): r for r in io.read_table(out, schemas.EVALUATION).to_pylist()}
    answers = io.read_table(evaluate.benchmark_answers_uri(out), schemas.BENCHMARK_ANSWERS).to_pylist()
    assert len(answers) == 6 and {(a["benchmark"], a["model"]) for a in answers} == {("videomme", model)}
    questions = {q.id: q for q in benchmarks.read_benchmark(str(folders["videomme"]), "videomme")[0]}
    for a in answers:
        assert a["extracted"] == benchmarks.extract("videomme", a["response"], questions[a["id"]])
        assert a["correct"] == (a["extracted"] == a["answer"]) and a["answer"] == questions[a["id"]].answer
        assert a["frames"] == 4 and a["prompt_tokens"] > 4 * 10 and 1 <= a["reply_tokens"] <= 16
    mine = [{**a, "categories": json.loads(a["categories"])} for a in answers]
    for key, s in benchmarks.summarize("videomme", mine).items():
        row = table[(model, "videomme_accuracy" if key == "all" else f"videomme_accuracy/{key}")]
        assert (row["value"], row["n"], row["split"]) == (s["value"], 6 if key == "all" else s["n"], "videomme")
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((s["ci_low"], s["ci_high"]), nan_ok=True)
    details = json.loads(table[(model, "videomme_accuracy")]["details"])
    assert details["malformed"] == sum(a["extracted"] is None for a in mine)
    assert (details["asked"], details["missing_video"], details["undecodable"], details["invalid"]) == (6, 0, 0, 0)
    assert details["frames_per_question"] == 4.0 and details["prompt_tokens_per_question"] > 40
    assert (tmp_path / "eval" / "benchmarks").is_dir()  # the decoded frames, for the next evaluation to reuse
    report = Path(evaluate.report_uri(out)).read_text()
    assert "| videomme_accuracy | videomme |" in report and "| videomme_accuracy/duration=short | videomme |" in report


def _lmms(script: str, payload: dict) -> dict:
    """Run `script` in lmms-eval's venv with `payload` as JSON on stdin; its JSON answer."""
    env = {"PATH": os.environ.get("PATH", ""), "HF_HOME": str(REPO / "bench" / ".cache" / "lmms-hf"),
           "HF_HUB_OFFLINE": "1", "NLTK_DATA": str(REPO / "bench" / ".cache" / "lmms-hf")}
    proc = subprocess.run([str(LMMS_PYTHON), "-c", script], input=json.dumps(payload), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


LMMS_SCRIPT = r"""
import json, random, sys
import lmms_eval.tasks.videomme.utils as v
import lmms_eval.tasks.mvbench.utils as m
import lmms_eval.tasks.nextqa.utils as n
data = json.load(sys.stdin)
out = {"prompts": {}, "scores": {}, "aggregate": {}, "nextqa_letters": []}
docs, replies = data["videomme"]
out["prompts"]["videomme"] = [v.videomme_doc_to_text(d, {"post_prompt": "\nAnswer with the option's letter from "
                              "the given choices directly."}) for d in docs]
results = [v.videomme_process_results(d, [r])["videomme_perception_score"] for d, r in zip(docs, replies)]
out["scores"]["videomme"] = [r["score"] for r in results]
out["aggregate"]["videomme"] = v.videomme_aggregate_results(results)
docs, replies = data["mvbench"]
out["prompts"]["mvbench"] = [m.mvbench_doc_to_text(d, {"post_prompt": "Only give the best option.\n"}) for d in docs]
results = [m.mvbench_process_results(d, [r])["mvbench_accuracy"] for d, r in zip(docs, replies)]
out["scores"]["mvbench"] = [r["score"] for r in results]
out["aggregate"]["mvbench"] = m.mvbench_aggregate_results(results)
docs, replies = data["nextqa"]
out["prompts"]["nextqa"] = [n.nextqa_doc_to_text_mc(d, {}) for d in docs]
index, choices = n.get_multi_choice_info(docs[0])
for d, r in zip(docs, replies):
    letters = set()
    for seed in range(6):  # lmms-eval draws a random letter for an unreadable reply: several letters show it
        random.seed(seed)
        letters.add(n.parse_multi_choice_response(r, choices, n.get_multi_choice_info(d)[0]))
    out["nextqa_letters"].append(sorted(letters))
print(json.dumps(out))
"""

REPLIES = ["A", "The answer is (C).", "C. red", "no idea", "", "I pick B", "(B) left", "It is a cat", "sitting",
           "Option B", "b", "Answer: D", "(A) (B)", "The best answer is: A.", "DNA B", "D.", "It's (d)",
           "the square stops", "Based on the video, C", "E", "1,000 (B)", "a-b", "c)", "Best option: C"]


@pytest.mark.slow
@pytest.mark.skipif(not LMMS_PYTHON.exists(), reason="lmms-eval's venv is not built (bench/.cache/lmms-venv)")
def test_same_prompts_and_scores_as_lmms_eval(folders):
    """Every layout's questions, replied to with REPLIES (right, wrong, malformed, quirky), through lmms-eval 0.7.3's
    own doc_to_text, process_results and aggregation: the same prompts, the same per-question scores and so the
    same per-category accuracies, and the same overall score except where this module differs on purpose (MVBench:
    lmms-eval leaves empty replies out; NExT-QA: lmms-eval draws a random letter for an unreadable reply)."""
    payload, mine = {}, {}
    for name, docs in (("videomme", videomme_docs()), ("mvbench", mvbench_docs()["moving_direction"]),
                       ("nextqa", nextqa_docs())):
        payload[name] = ((docs * len(REPLIES))[:len(REPLIES)], REPLIES)
    questions = {"videomme": benchmarks.read_benchmark(str(folders["videomme"]), "videomme")[0],
                 "mvbench": benchmarks.read_benchmark(str(folders["mvbench"]), "mvbench")[0][:2],
                 "nextqa": benchmarks.read_benchmark(str(folders["nextqa"]), "nextqa")[0]}
    for name, qs in questions.items():
        mine[name] = benchmarks.score(name, (qs * len(REPLIES))[:len(REPLIES)], REPLIES)
    got = _lmms(LMMS_SCRIPT, payload)
    for name in ("videomme", "mvbench", "nextqa"):
        assert got["prompts"][name] == [r["prompt"] for r in mine[name]], name
    for name in ("videomme", "mvbench"):
        assert got["scores"][name] == [float(r["correct"]) for r in mine[name]], name
    assert got["aggregate"]["videomme"] == pytest.approx(100 * sum(r["correct"] for r in mine["videomme"])
                                                         / len(REPLIES))
    answered = [r for r in mine["mvbench"] if r["response"] != ""]
    assert got["aggregate"]["mvbench"] == pytest.approx(100 * sum(r["correct"] for r in answered) / len(answered))
    for record, letters in zip(mine["nextqa"], got["nextqa_letters"]):
        assert letters == [record["extracted"]] if record["extracted"] else len(letters) > 1, record["response"]
