"""Sampling engines: the vLLM backend vs the transformers backend on the same requests, responses/s and tokens/s.

    .venv/bin/python bench/sample_bench.py [--family qwen2_vl] [--questions 8] [--candidates 2] [--max-tokens 32] \
        [--repeats 3] [--model DIR]

Requests: the sample stage's first turn for one shard (`sample.first_turn`): --questions questions on a 16-frame
clip (a toy h264 clip decoded by the frames stage's decoder at 336x448), each with --candidates hint requests on the
clean frames (temperature 1, top-p 0.9) and --candidates losing requests on lean 2-frame views (temperature 1,
top-p 1), max --max-tokens new tokens, per-request seeds. Model: a toy of --family built offline (random weights,
so responses rarely stop early), or --model.

Each backend runs in its own subprocess, because in-process vLLM on CPU binds OpenMP threads and disables
`torch.set_num_threads` for the whole process; both get OMP_NUM_THREADS = the CPU count. Per backend: engine start,
one warm-up call, then --repeats timed calls of `engine.generate(all requests)` (vLLM: one `LLM.generate`;
transformers: one `model.generate` per response); medians reported. Writes bench/results/sample.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BACKENDS = ("vllm", "transformers")


def build_requests(model: str, questions: int, candidates: int, max_tokens: int, work: Path) -> Path:
    """Store the stage's first-turn requests for one shard (JSON + one .npy of frames each, no pickle); returns
    the JSON file."""
    from transformers import AutoProcessor

    from leanpo_core import models, toy
    from leanpo_core.config import FramesConfig, SampleConfig
    from leanpo_core.decode import decode_video
    from leanpo_core.sample import first_turn

    clip = toy.write_test_clip(work / "clip.mp4", num_frames=48, size=(336, 448))
    video = decode_video(str(clip), FramesConfig(num_frames=16))
    row = {"video_key": "bench", "frame_indices": video.frame_indices, "fps": video.fps,
           "num_frames_total": video.num_frames_total}
    config = SampleConfig(model=model, num_candidates=candidates, max_new_tokens=max_tokens)
    # first_turn only needs the engine's adapter and processor to build prompts
    shim = argparse.Namespace(adapter=models.adapter_for(model), processor=AutoProcessor.from_pretrained(model))
    requests = []
    for i in range(questions):
        question = {"id": f"q{i}", "question": f"What does the shape do in the video? ({i})",
                    "answer": "A coloured square moves across the video."}
        requests += first_turn(shim, question, row, video.frames, config, pos=i)[1]
    import dataclasses

    import numpy as np

    stored = []
    for index, request in enumerate(requests):
        fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request) if f.name != "frames"}
        frames = work / f"frames-{index}.npy"
        np.save(frames, request.frames, allow_pickle=False)
        stored.append({**fields, "frames": frames.name})
    path = work / "requests.json"
    path.write_text(json.dumps(stored, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    return path


def load_requests(path: str) -> list:
    """The requests `build_requests` stored."""
    import numpy as np

    from leanpo_core.engine import Request

    folder = Path(path).parent
    return [Request(**{**r, "frames": np.load(folder / r["frames"], allow_pickle=False)})
            for r in json.loads(Path(path).read_text())]


def worker(backend: str, model: str, requests_path: str, repeats: int, out: str) -> None:
    """In a fresh process: start the engine, warm up, time `repeats` calls; write the numbers as JSON."""
    from leanpo_core.engine import open_engine

    requests = load_requests(requests_path)
    start = time.perf_counter()
    engine = open_engine(model, backend, max_model_len=2048, max_num_seqs=max(16, len(requests)))
    started = time.perf_counter()
    engine.generate(requests)
    warm = time.perf_counter()
    times, tokens = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = engine.generate(requests)
        times.append(time.perf_counter() - t0)
        tokens = sum(c.num_tokens for completions in results for c in completions)
    Path(out).write_text(json.dumps({"start_s": started - start, "warmup_s": warm - started, "times": times,
                                     "responses": sum(r.n for r in requests), "tokens": tokens}))


def run_worker(backend: str, model: str, requests: Path, repeats: int, work: Path) -> dict:
    out = work / f"{backend}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
    cmd = [sys.executable, __file__, "--worker", backend, "--model", model, "--requests", str(requests),
           "--repeats", str(repeats), "--result", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def report(results: dict[str, dict], args: argparse.Namespace, model_label: str, command: str) -> str:
    base = results["transformers"]
    base_rate = base["responses"] / statistics.median(base["times"])
    lines = ["# Sampling engines: vLLM vs transformers", "",
             f"`{command}` on {platform.node()} ({os.cpu_count()} CPUs, OMP_NUM_THREADS={os.cpu_count()}, load "
             f"average {os.getloadavg()[0]:.1f} at the end); model {model_label}; one shard of the sample stage's "
             f"first turn: {args.questions} questions x {args.candidates} candidates x 2 sides = "
             f"{base['responses']} responses of at most {args.max_tokens} tokens; medians of {args.repeats} calls "
             "after a warm-up call, each backend in its own process.", "",
             "| backend | engine start s | warm-up s | s per shard call | responses/s | tokens/s | responses/s vs "
             "transformers |", "|---|---|---|---|---|---|---|"]
    for backend in BACKENDS:
        r = results[backend]
        median = statistics.median(r["times"])
        lines.append(f"| {backend} | {r['start_s']:.1f} | {r['warmup_s']:.1f} | {median:.2f} | "
                     f"{r['responses'] / median:.1f} | {r['tokens'] / median:.0f} | "
                     f"{r['responses'] / median / base_rate:.2f} |")
    lines += ["", "Tokens count every generated token (stop token included); the backends draw different samples "
              "from the same seeds, so token totals can differ slightly."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_vl", help="toy model family (ignored with --model)")
    parser.add_argument("--model", default=None, help="a model folder instead of a toy")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--requests", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.model, args.requests, args.repeats, args.result)
        return ""
    from leanpo_core import toy

    with tempfile.TemporaryDirectory(prefix="sample-bench-") as tmp:
        work = Path(tmp)
        model = args.model or str(toy.build_toy_model(args.family, work / "model"))
        label = args.model or f"toy {args.family} (random weights, hidden 64, 2 layers)"
        requests = build_requests(model, args.questions, args.candidates, args.max_tokens, work)
        results = {backend: run_worker(backend, model, requests, args.repeats, work) for backend in BACKENDS}
    command = "python bench/sample_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, args, label, command.strip())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sample.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
