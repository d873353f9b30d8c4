"""Standard video benchmarks in their published layouts: read the questions, ask each as the benchmark asks it, read
the option letter out of the reply by the benchmark's rule, and score accuracy per category.

Layouts, read from a local folder or an s3:// prefix (listed once; `leanpo_core.io` reads both):
  videomme  Video-MME (Fu et al. 2024): `videomme/test-*.parquet` (else .parquet/.json/.jsonl files at the top) of
            question_id, videoID (else video_id), duration, domain, sub_category, task_type, question, options
            ["A. ...", ..., "D. ..."], answer (a letter); videos `<videoID>.mp4` (.MP4, .mkv) anywhere below.
            Categories: duration, domain, task_type.
  mvbench   MVBench (Li et al. 2024): `json/<task>.json` lists of {video, question, candidates, answer (a
            candidate's text)}; videos in the task's published folder (TASK_FOLDERS, under `video/` or not), else in
            a folder named after the task, else the one path below the root ending in `<video>`. Category: task.
  nextqa    NExT-QA multiple choice (Xiao et al. 2021): `test.csv` (else `val.csv`, else the one CSV but
            `train.csv`) of video, question, a0..a4, answer (0-4), qid, type; videos `<video>.mp4` anywhere below, or
            as `map_vid_vidorID.json` maps them (NExTVideo/<dir>/<vidorID>.mp4). Categories: type (CW, CH, TN, TC,
            TP, DL, DC, DO) and its group (causal, temporal, descriptive).

Prompts and answer extraction are those of lmms-eval 0.7.3 (the harness the field reports these benchmarks with),
its default model settings, and its generation length where the task sets one (16 tokens for Video-MME and
MVBench): a score here reads like a score there. A reply from which no option can be read is MALFORMED: it counts as
wrong and is recorded so (`extracted` None). Two places where lmms-eval does otherwise, on purpose:
  - NExT-QA: lmms-eval picks a random letter for an unreadable reply (a fifth of them score); here it is wrong.
  - MVBench: lmms-eval leaves empty replies out of its denominator; here they count as wrong.
Quirks kept so that scores agree: a Video-MME reply without any option letter reads as the last uppercase A-D inside
a word ("Based on the video" is B); MVBench reads the article in "it is a cat" as option A (its rule lowercases the
reply, then takes the first standalone letter a-e).

Questions whose video is not below the root or cannot be decoded are left out and counted (`missing_video`,
`undecodable`), as are rows that break the layout (`invalid`: e.g. an answer that is none of the options).

    questions, counts = read_benchmark("/data/Video-MME", "videomme")
    extract("videomme", "The answer is (C).", questions[0])                        # -> "C"
"""

from __future__ import annotations

import csv
import hashlib
import io as pyio
import json
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from leanpo_core import io, prompts, schemas, stats
from leanpo_core.config import FramesConfig
from leanpo_core.frames import FrameStore, frames_metadata, run_frames
from leanpo_core.launch import BadInput

LETTERS = "ABCDEFGH"
VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv", ".webm", ".avi", ".mov")  # in the order a name is tried

# --- Video-MME ---------------------------------------------------------------------------------------------------

# lmms-eval's instruction names subtitles although its default Video-MME task gives none; kept as it asks.
VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video and the "
                        "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
VIDEOMME_POST = "\nAnswer with the option's letter from the given choices directly."
# Phrases after which lmms-eval's multiple-choice reader looks for a letter (its `mcq_extract`, lowercase).
ANSWER_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
                  "best answer is", "the correct option is", "correct option is", "the best option is",
                  "best option is", "the choice is", "choice is", "the correct choice is", "correct choice is",
                  "i choose", "i select", "i pick", "my answer is", "my choice is",
                  "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")
# How much a letter's form says it is the answer; the highest form wins, then the latest position.
FORM_RANK = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
             "space": 2, "anywhere": 0}


def videomme_prompt(question: str, options: list[str]) -> str:
    """Video-MME's question as lmms-eval asks it (default model settings; the options keep their "A. " labels)."""
    return VIDEOMME_INSTRUCTION + "\n" + question + "\n" + "\n".join(options) + "\n" + VIDEOMME_POST


def _strip_each(text: str, chars: str) -> str:
    """`text` stripped of each of `chars` in turn (one `str.strip(c)` per character, not the set at once)."""
    for char in chars:
        text = text.strip(char)
    return text


def videomme_letter(reply: str, letters: str = "ABCD") -> str | None:
    """The option letter of a Video-MME reply (lmms-eval 0.7.3's multiple-choice reader), or None (malformed).

    Every way a letter L can appear is a candidate ranked by its form: the reply opens with L standing alone (10),
    ends with it (9), L is the first uppercase L after an answer phrase (7), "(L)" (6), "L." (5), "L:" (4), "L)" (3),
    "L " (2); only when none appears, an uppercase L anywhere (0). The highest rank wins, then the latest position.
    Worked cases:
        "C"                        -> C    (start)
        "The answer is (B)."       -> B    (the phrase outranks the parentheses of the same B)
        "A. the red one"           -> A    (start: "A" then a non-letter)
        "I think (A), no, (C)"     -> C    (parentheses, the later one)
        "Best option: C"           -> C    (end; the "B" of "Best" is part of a word)
        "Based on the video"       -> B    (nothing else: the uppercase B inside a word)
        "no idea"                  -> None (malformed)
    """
    text = _strip_each(reply.strip(), ",.!?;:'\"")
    if not text:
        return None
    padded = f" {text} "
    found: list[tuple[int, int, str]] = []  # (rank, position, letter)
    for form, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                          ("space", "{} ")):
        found += [(FORM_RANK[form], padded.rfind(pattern.format(L)), L) for L in letters
                  if pattern.format(L) in padded]
    lower = padded.lower()
    for phrase in ANSWER_PHRASES:
        at = lower.find(phrase)
        if at >= 0:
            found += [(FORM_RANK["phrase"], pos, L) for L in letters
                      if (pos := padded.find(L, at + len(phrase))) >= 0]
    bare = padded.strip()
    for L in letters:
        if bare.startswith(L) and (len(bare) == 1 or not bare[1].isalpha()):
            found.append((FORM_RANK["start"], 0, L))
        if bare.endswith(L) and (len(bare) == 1 or not bare[-2].isalpha()):
            found.append((FORM_RANK["end"], len(padded) - 1, L))
    if not found:
        found = [(FORM_RANK["anywhere"], padded.rfind(L), L) for L in letters if L in padded]
    return max(found, key=lambda c: (c[0], c[1]))[2] if found else None


# --- MVBench -----------------------------------------------------------------------------------------------------

MVBENCH_POST = "Only give the best option.\n"
# Where each task's videos are published: the lmms-eval ("video" revision) folder first, then the first release's.
_CHARADES, _CLEVRER, _PERCEPTION = ("star/Charades_segment", "star/Charades_v1_480"), ("clevrer/video_validation",), \
    ("perception/videos",)
TASK_FOLDERS = {
    **dict.fromkeys(("action_sequence", "action_prediction", "object_interaction"), _CHARADES),
    **dict.fromkeys(("object_existence", "moving_direction", "moving_count", "moving_attribute",
                     "counterfactual_inference"), _CLEVRER),
    **dict.fromkeys(("object_shuffle", "action_count", "state_change", "character_order"), _PERCEPTION),
    "action_antonym": ("ssv2_video_mp4", "ssv2_video"), "fine_grained_action": ("Moments_in_Time_Raw/videos",),
    "unexpected_action": ("FunQA_test/test",), "action_localization": ("sta/sta_video_segment", "sta/sta_video"),
    "scene_transition": ("scene_qa/video",), "fine_grained_pose": ("nturgbd_convert", "nturgbd"),
    "egocentric_navigation": ("vlnqa",), "episodic_reasoning": ("tvqa/video_fps3_hq_segment", "tvqa/frames_fps3_hq"),
}
# The VQA evaluation's punctuation pass, which lmms-eval's MVBench reader runs before looking for a letter.
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                    "?", "!")
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_LETTER_FIRST = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_STANDALONE = re.compile(r"\b([a-e])\b")


def mvbench_prompt(question: str, candidates: list[str]) -> str:
    """MVBench's question as lmms-eval asks it: "Question:<q>\\nOption:\\n(A) <c0>\\n(B) <c1>\\n...Only give the best
    option.\\n"."""
    options = "".join(f"({LETTERS[i]}) {c}\n" for i, c in enumerate(candidates))
    return "Question:" + question + "\nOption:\n" + options + MVBENCH_POST


def _vqa_punctuation(text: str) -> str:
    """A punctuation mark is dropped where it touches a space (or anywhere, once the text holds a digit-comma-digit)
    and is a space elsewhere; then periods not before a digit go, at most 32 of them (lmms-eval passes re.UNICODE,
    32, where re.sub takes its count)."""
    out, drop_all = text, _DIGIT_COMMA.search(text) is not None
    for mark in _VQA_PUNCTUATION:
        out = out.replace(mark, "" if drop_all or f"{mark} " in text or f" {mark}" in text else " ")
    return _PERIOD.sub("", out, count=32)


def mvbench_letter(reply: str) -> str | None:
    """The option letter of an MVBench reply (lmms-eval 0.7.3's `mcq_acc` reading), or None (malformed).

    A reply that is "<letter>. <text>" on one line gives that letter; otherwise the reply is put through the VQA
    punctuation pass, lowercased, and the first standalone letter a-e is the answer. Worked cases:
        "(B) the man jumps"   -> B
        "c. sitting down"     -> C
        "It is a cat"         -> A    (the article "a" stands alone)
        "Option D"            -> D
        "sitting"             -> None (malformed)
    """
    first = _LETTER_FIRST.match(reply.strip())
    if first:
        return first.group(1).upper()
    text = _vqa_punctuation(reply.replace("\n", " ").replace("\t", " ").strip())
    text = _strip_each(text, "'\")(").strip().lower()
    standalone = _STANDALONE.search(text)
    return standalone.group(1).upper() if standalone else None


# --- NExT-QA -----------------------------------------------------------------------------------------------------

NEXTQA_GROUPS = {"C": "causal", "T": "temporal", "D": "descriptive"}


def nextqa_prompt(question: str, options: list[str]) -> str:
    """NExT-QA's multiple-choice question as lmms-eval asks it: the question, then "A. <a0>" ... "E. <a4>"."""
    return "\n".join([question.strip()] + [f"{LETTERS[i]}. {o.strip()}" for i, o in enumerate(options)])


def nextqa_letter(reply: str, options: list[str]) -> str | None:
    """The option letter of a NExT-QA reply (lmms-eval 0.7.3's reading, MMMU's parser), or None (malformed).

    Letters are looked for as "(L)", else as "L " (a letter that ends a word counts, "DNA " holds "A "), else as
    "L."; only when none is found and the reply is longer than five words, an option's text inside the reply counts
    for its letter. Several found: the one written last. Worked cases:
        "(C)"                                      -> C
        "B"                                        -> B
        "A or B"                                   -> B    (both "A " and "B " found: the later one)
        "the boy wants to pick up the ball"        -> the letter whose option reads "pick up the ball"
        "maybe"                                    -> None (lmms-eval: a random letter)
    """
    text = f" {_strip_each(reply, ',.!?;:' + chr(39))} "
    letters = LETTERS[:len(options)]
    found, form = [L for L in letters if f"({L})" in text], "parentheses"
    if not found:
        found, form = [L for L in letters if f"{L} " in text], "space"
    if not found:
        found, form = [L for L in letters if f"{L}." in text], "period"
    if not found and len(text.split()) > 5:
        found, form = [L for L, o in zip(letters, options) if o.strip().lower() in text.lower()], "content"
    if len(found) <= 1:
        return found[0] if found else None
    if form == "content":
        positions = [text.lower().rfind(options[letters.index(L)].strip().lower()) for L in found]
    elif form == "parentheses":
        positions = [text.rfind(f"({L})") for L in found]
    else:  # "L." candidates are placed by " L " too, as lmms-eval places them (all -1: the first one found wins)
        positions = [text.rfind(f" {L} ") for L in found]
    return found[int(np.argmax(positions))]


# --- Reading the layouts -----------------------------------------------------------------------------------------

class BenchmarkError(BadInput):
    """A benchmark folder does not hold the layout it is said to have (exits 65: a retry cannot fix it)."""


@dataclass(frozen=True)
class Question:
    """One benchmark question, ready to ask: the prompt as the benchmark asks it and the right option's letter."""

    id: str                                     # Video-MME question_id, MVBench <task>/<index>, NExT-QA <video>_<qid>
    video: str                                  # URI of the video (or frames folder); "" when none is below the root
    prompt: str                                 # the user turn, chat-control tokens defused (`prompts.defuse`)
    options: tuple[str, ...]                    # option texts in letter order
    answer: str                                 # the right option's letter
    categories: dict[str, str] = field(default_factory=dict)  # axis -> value, e.g. {"duration": "short"}


class _Tree:
    """Every file below a root, listed once: lookups by relative path, by name stem, and by path ending."""

    def __init__(self, root: str, options: io.StorageOptions | None):
        self.root = root.rstrip("/")
        self.options = options
        self.files = [uri[len(self.root) + 1:] for uri in io.list_uris(self.root, options)]
        self.paths = set(self.files)
        self.paths.update(posixpath.dirname(f) for f in self.files)  # frames folders are videos too
        self.by_name: dict[str, list[str]] = {}
        for path in sorted(self.paths):
            self.by_name.setdefault(posixpath.basename(path), []).append(path)

    def uri(self, relative: str) -> str:
        return io.join_uri(self.root, relative)

    def read(self, relative: str) -> bytes:
        return io.read_bytes(self.uri(relative), self.options)

    def ending(self, tail: str) -> str:
        """URI of the one path that is `tail` or ends in "/<tail>", else "" (none, or several: ambiguous)."""
        hits = [p for p in self.by_name.get(posixpath.basename(tail), []) if p == tail or p.endswith("/" + tail)]
        return self.uri(hits[0]) if len(hits) == 1 else ""

    def video(self, stem: str) -> str:
        """URI of `<stem><suffix>` anywhere below the root, suffixes in VIDEO_SUFFIXES order, else ""."""
        for suffix in VIDEO_SUFFIXES:
            if found := self.ending(stem + suffix):
                return found
        return ""


def _records(tree: _Tree, relative: str) -> list[dict]:
    """Rows of a .parquet, .json (a list) or .jsonl question file."""
    data = tree.read(relative)
    if relative.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(pyio.BytesIO(data)).to_pylist()
    if relative.endswith(".jsonl"):
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    return json.loads(data)


def _text(value) -> str:
    return "" if value is None else str(value)


def _read_videomme(tree: _Tree) -> tuple[list[Question], list[str]]:
    published = sorted(f for f in tree.files if re.fullmatch(r"(.*/)?videomme/test-[^/]*\.parquet", f))
    files = published or sorted(f for f in tree.files if "/" not in f and f.endswith((".parquet", ".json", ".jsonl")))
    if not files:
        raise BenchmarkError(f"{tree.root}: no Video-MME question table (videomme/test-*.parquet, or a .parquet, "
                                ".json or .jsonl file at the top)")
    questions, invalid = [], []
    for name in files:
        for row in _records(tree, name):
            qid, answer = _text(row.get("question_id")), _text(row.get("answer")).strip().upper()
            options = [_text(o) for o in row.get("options") or []]
            stem = _text(row.get("videoID") or row.get("video_id"))
            if not (qid and stem and row.get("question") and len(options) == 4 and answer in "ABCD" and answer):
                invalid.append(f"{name}: question {qid or '?'} lacks a question, 4 options, a letter or a video")
                continue
            labels = [re.sub(r"^[A-D]\.\s*", "", o) for o in options]
            questions.append(Question(
                qid, tree.video(stem), prompts.defuse(videomme_prompt(_text(row["question"]), options)),
                tuple(labels), answer,
                {axis: _text(row.get(axis)) or "unknown" for axis in ("duration", "domain", "task_type")}))
    return questions, invalid


def _read_mvbench(tree: _Tree) -> tuple[list[Question], list[str]]:
    files = sorted(f for f in tree.files if re.fullmatch(r"(json/)?[^/]+\.json", f))
    if not files:
        raise BenchmarkError(f"{tree.root}: no MVBench task file (json/<task>.json)")
    questions, invalid = [], []
    for name in files:
        task = posixpath.basename(name).removesuffix(".json")
        folders = TASK_FOLDERS.get(task, ()) + (task,)
        for index, row in enumerate(_records(tree, name)):
            candidates = [_text(c) for c in row.get("candidates") or []]
            answer, video = _text(row.get("answer")), _text(row.get("video"))
            if answer not in candidates or not video or len(candidates) > 5:
                invalid.append(f"{name}[{index}]: the answer is none of its (at most 5) candidates, or no video")
                continue
            found = next((tree.uri(f"{base}{folder}/{video}") for folder in folders for base in ("video/", "")
                          if f"{base}{folder}/{video}" in tree.paths), "")
            questions.append(Question(
                f"{task}/{index}", found or tree.ending(video),
                prompts.defuse(mvbench_prompt(_text(row.get("question")), candidates)), tuple(candidates),
                LETTERS[candidates.index(answer)], {"task": task}))
    return questions, invalid


def _read_nextqa(tree: _Tree) -> tuple[list[Question], list[str]]:
    tables = {posixpath.basename(f): f for f in sorted(tree.files, reverse=True) if f.endswith(".csv")}
    others = [name for name in tables if name != "train.csv"]
    name = tables.get("test.csv") or tables.get("val.csv") or (tables[others[0]] if len(others) == 1 else None)
    if name is None:
        raise BenchmarkError(f"{tree.root}: no NExT-QA question table (test.csv or val.csv; found "
                                f"{sorted(tables) or 'no CSV'})")
    mapped = {}
    if found := tree.ending("map_vid_vidorID.json"):
        mapped = json.loads(io.read_bytes(found, tree.options))  # {video: "<dir>/<vidorID>"}
    questions, invalid = [], []
    for row in csv.DictReader(pyio.StringIO(tree.read(name).decode("utf-8-sig"))):
        options = [_text(row.get(f"a{i}")) for i in range(5)]
        video, answer = _text(row.get("video")).strip(), _text(row.get("answer")).strip()
        if not (video and row.get("question") and answer in ("0", "1", "2", "3", "4")):
            invalid.append(f"{name}: video {video or '?'} qid {row.get('qid')}: no question, or answer not 0-4")
            continue
        where = tree.video(mapped[video]) if video in mapped else tree.video(video)
        kind = _text(row.get("type")).strip() or "unknown"
        questions.append(Question(
            f"{video}_{_text(row.get('qid')).strip()}", where, prompts.defuse(nextqa_prompt(row["question"], options)),
            tuple(o.strip() for o in options), LETTERS[int(answer)],
            {"type": kind, "group": NEXTQA_GROUPS.get(kind[:1], "other")}))
    return questions, invalid


@dataclass(frozen=True)
class Layout:
    """A published benchmark layout: how its questions are read, its category axes, how a reply is read, and the
    generation length its harness sets (None: the stage's `max_new_tokens`)."""

    name: str
    axes: tuple[str, ...]
    read: Callable[[_Tree], tuple[list[Question], list[str]]]
    extract: Callable[[str, Question], str | None]
    max_new_tokens: int | None
    rule: str


LAYOUTS = {
    "videomme": Layout("videomme", ("duration", "domain", "task_type"), _read_videomme,
                       lambda reply, q: videomme_letter(reply), 16,
                       "Video-MME prompt and letter reading of lmms-eval 0.7.3 (videomme, default model settings)"),
    "mvbench": Layout("mvbench", ("task",), _read_mvbench, lambda reply, q: mvbench_letter(reply), 16,
                      "MVBench prompt and letter reading of lmms-eval 0.7.3 (mvbench_<task>); empty replies count "
                      "as wrong"),
    "nextqa": Layout("nextqa", ("type", "group"), _read_nextqa,
                     lambda reply, q: nextqa_letter(reply, list(q.options)), None,
                     "NExT-QA multiple-choice prompt and letter reading of lmms-eval 0.7.3 (nextqa_mc_test); an "
                     "unreadable reply counts as wrong, not as a random letter"),
}


def layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise BenchmarkError(f"unknown benchmark layout {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def read_benchmark(root: str, name: str, options: io.StorageOptions | None = None) -> tuple[list[Question], dict]:
    """(every valid question of the benchmark at `root` in file order; counts: questions read, invalid rows (with up
    to five reasons), questions whose video is not below the root)."""
    tree = _Tree(root if "://" in root else posixpath.abspath(root), options)
    questions, invalid = layout(name).read(tree)
    return questions, {"questions": len(questions) + len(invalid), "invalid": len(invalid),
                       "invalid_examples": invalid[:5], "missing_video": sum(not q.video for q in questions)}


def spread(questions: list[Question], limit: int) -> list[Question]:
    """At most `limit` questions (0: all), evenly spaced over the file order, so each duration or task keeps about its
    share (Video-MME's table runs short, medium, long; MVBench's tasks follow one another)."""
    if not limit or len(questions) <= limit:
        return list(questions)
    return [questions[i] for i in sorted({int(i) for i in np.linspace(0, len(questions) - 1, limit).round()})]


def extract(name: str, reply: str, question: Question) -> str | None:
    """The option letter `reply` gives under the benchmark's rule, or None: malformed, counted wrong."""
    return layout(name).extract(reply, question)


def score(name: str, questions: list[Question], replies: list[str]) -> list[dict]:
    """One record per question: id, video, categories, prompt, answer, response, extracted (None: malformed),
    correct (the extracted letter is the answer)."""
    records = []
    for question, reply in zip(questions, replies, strict=True):
        letter = extract(name, reply, question)
        records.append({"id": question.id, "video": question.video, "categories": question.categories,
                        "prompt": question.prompt, "answer": question.answer, "response": reply,
                        "extracted": letter, "correct": letter == question.answer})
    return records


def summarize(name: str, records: list[dict]) -> dict[str, dict]:
    """{"all": {value, n, ci_low, ci_high}, "<axis>=<value>": {...}, ...}: accuracy overall and per category (axes
    in the layout's order, values sorted), each with n and its 95% Wilson interval."""
    correct = [r["correct"] for r in records]
    summary = {"all": stats.accuracy_summary(correct)["all"]}
    for axis in layout(name).axes:
        groups = stats.accuracy_summary(correct, [r["categories"].get(axis, "unknown") for r in records])
        summary.update({f"{axis}={value}": groups[value] for value in sorted(set(groups) - {"all"})})
    return summary


# --- Frames ------------------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """A benchmark whose videos went through the frames stage: the questions that can be asked and their frames."""

    layout: Layout
    root: str
    questions: list[Question]                   # those with decoded frames, in file order
    store: FrameStore | None
    counts: dict

    def frames_of(self, question: Question) -> int:
        return int(self.store.rows[self.store.key_for(question.video)]["frames_shape"][0])

    def items(self, chunk: int = 256) -> Iterator[list[dict]]:
        """The questions as generation items ({id, question: the prompt, frames, meta}), `chunk` at a time: the
        frames of one chunk are in memory at once, not the whole benchmark's."""
        for start in range(0, len(self.questions), chunk):
            part = self.questions[start:start + chunk]
            loaded = self.store.load(sorted({self.store.key_for(q.video) for q in part}))
            yield [{"id": q.id, "question": q.prompt, "frames": clip, "meta": frames_metadata(row, clip)}
                   for q in part for clip, row in [loaded[self.store.key_for(q.video)]]]


def frames_folder(base: str, root: str, name: str, config: FramesConfig) -> str:
    """Where a benchmark's decoded frames are kept below `base`: one folder per (benchmark, layout, frames config), so
    every evaluation that names the same ones reuses them and no other sampling mixes in."""
    key = hashlib.sha256(f"{root}\n{name}\n{config.config_hash()}".encode()).hexdigest()[:12]
    return io.join_uri(base, f"{name}-{key}")


def prepare(root: str, name: str, num_frames: int, max_questions: int, frames_base: str,
            options: io.StorageOptions | None = None) -> Prepared:
    """Read the benchmark, keep `max_questions` of it (`spread`), and decode the videos through the frames stage
    (uniform `num_frames` per video) into `frames_folder(frames_base, ...)`, resuming what is already there."""
    questions, counts = read_benchmark(root, name, options)
    questions = spread(questions, max_questions)
    located = [q for q in questions if q.video]
    counts.update(asked=len(questions), missing_video=len(questions) - len(located))
    config = FramesConfig(num_frames=num_frames)
    folder = frames_folder(frames_base, root, name, config)
    frames_uri, store = io.join_uri(folder, "frames"), None
    if located:
        videos = io.join_uri(folder, "videos.parquet")
        io.write_table([{"id": q.id, "video": q.video, "question": q.prompt, "answer": q.answer, "split": name,
                         "source": name} for q in located], videos, schemas.VIDEOS, options)
        run_frames(videos, frames_uri, io.join_uri(folder, "failures"), config, options, progress=False)
        store = FrameStore(frames_uri, options)
        located = [q for q in located if store.key_for(q.video)]
    counts["undecodable"] = len(questions) - counts["missing_video"] - len(located)
    return Prepared(layout(name), root, located, store, counts)
