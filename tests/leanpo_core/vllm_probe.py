"""Start a real vLLM engine per model folder, generate from one video with per-token log-probs, write JSON.

Run by tests/leanpo_core/test_models.py in its own interpreter: vLLM binds OpenMP threads and sets up a process
group, which should not leak into the pytest process. All engines run in this one process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, executor "uni"), so the ~10 s vLLM import is paid once, not per engine.

    python tests/leanpo_core/vllm_probe.py --frames F.npy --meta M.json --out R.json MODEL_DIR [MODEL_DIR ...]

Each folder's result: the rendered prompt, vLLM's prompt token ids, and per sample the generated token ids and their
log-probs (logprobs=0: the sampled token's raw log-prob), or the error text if the engine failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

QUESTION = "What moves in the video?"
SAMPLING = dict(n=2, temperature=1.0, top_p=0.9, max_tokens=8, logprobs=0, seed=1)


def probe(model_dir: str, frames, meta: dict) -> dict:
    """One engine start, one generate call (2 samples) for the folder's family."""
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from leanpo_core.models import adapter_for

    adapter = adapter_for(model_dir)
    prompt = adapter.build_prompt(AutoProcessor.from_pretrained(model_dir), QUESTION)
    start = time.perf_counter()
    llm = LLM(**adapter.engine_kwargs(model=model_dir, dtype="float32", max_model_len=512, max_num_seqs=4,
                                      enforce_eager=True, seed=0, distributed_executor_backend="uni"))
    started = time.perf_counter()
    out = llm.generate([{"prompt": prompt, "multi_modal_data": adapter.vllm_video_input(frames, meta)}],
                       SamplingParams(**SAMPLING), use_tqdm=False)[0]
    result = {
        "family": adapter.name, "prompt": prompt, "prompt_token_ids": list(out.prompt_token_ids),
        "samples": [{"text": s.text, "token_ids": list(s.token_ids),
                     "logprobs": [lp[t].logprob for t, lp in zip(s.token_ids, s.logprobs)]} for s in out.outputs],
        "engine_start_s": started - start, "generate_s": time.perf_counter() - started,
    }
    del llm
    gc.collect()
    return result


def main() -> None:
    import numpy as np
    from vllm.distributed import cleanup_dist_env_and_memory

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="toy model folders")
    parser.add_argument("--frames", required=True, type=Path, help=".npy of (T, H, W, 3) uint8 frames")
    parser.add_argument("--meta", required=True, type=Path, help="JSON video metadata of those frames")
    parser.add_argument("--out", required=True, type=Path, help="JSON results, keyed by model folder")
    args = parser.parse_args()
    frames, meta = np.load(args.frames), json.loads(args.meta.read_text())
    results = {}
    for model_dir in args.models:
        try:
            results[model_dir] = probe(model_dir, frames, meta)
        except Exception:  # one family's failure must not hide the others' results
            results[model_dir] = {"error": traceback.format_exc()}
        cleanup_dist_env_and_memory()
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
