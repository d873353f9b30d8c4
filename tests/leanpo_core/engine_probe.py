"""Run pickled `engine.Request`s through the vLLM backend of `leanpo_core.engine`, twice, and pickle the completions.

Run by tests/leanpo_core/test_engine.py in its own interpreter: in-process vLLM binds OpenMP threads and replaces
`torch.set_num_threads` for the whole process, which must not leak into pytest. One process serves every model
folder, so the ~10 s vLLM import is paid once.

    python tests/leanpo_core/engine_probe.py REQUESTS.pkl OUT.pkl

REQUESTS.pkl: {model folder: [Request, ...]}. OUT.pkl: {model folder: {"first": completions, "second": the same
requests again (determinism), "engine_start_s": ..., and after_a_failed_step's keys} or {"error": traceback}}.
"""

from __future__ import annotations

import pickle
import sys
import time
import traceback


def after_a_failed_step(engine, requests) -> dict:
    """A model step that raises once (fault injected into the in-process executor), then the same requests again:
    what the failed call raised, how many requests vLLM still held after it, and the completions of the next call."""
    executor = engine.llm.llm_engine.engine_core.engine_core.model_executor
    real = executor.execute_model

    def fail_once(*args, **kwargs):
        executor.execute_model = real
        raise RuntimeError("injected step failure")

    executor.execute_model = fail_once
    try:
        engine.generate(requests)
        raised = None
    except RuntimeError as exc:
        raised = str(exc)
    finally:
        executor.execute_model = real
    return {"failed_raised": raised, "failed_left": engine.llm.llm_engine.get_num_unfinished_requests(),
            "after_failure": engine.generate(requests)}


def main() -> None:
    from leanpo_core.engine import open_engine

    requests_path, out_path = sys.argv[1:3]
    with open(requests_path, "rb") as f:
        by_model = pickle.load(f)
    results = {}
    for model_dir, requests in by_model.items():
        try:
            start = time.perf_counter()
            engine = open_engine(model_dir, "vllm", max_model_len=1024, max_num_seqs=8)
            started = time.perf_counter()
            try:
                results[model_dir] = {"first": engine.generate(requests), "second": engine.generate(requests),
                                      "engine_start_s": started - start, **after_a_failed_step(engine, requests)}
            finally:
                engine.close()
        except Exception:  # one family's failure must not hide the others' results
            results[model_dir] = {"error": traceback.format_exc()}
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main()
