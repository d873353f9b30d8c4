"""Generation engines: one interface, two backends (vLLM, the default wherever `vllm` imports; transformers).

Both backends take the same `Request`s (a chat prompt from `FamilyAdapter.build_prompt`, already sampled frames and
their `models.video_metadata`) and hand them to the model through the same family adapter (`vllm_video_input` for
vLLM, `encode` for transformers), so the two see identical prompt token ids and pixels. They stop on the same token
set (the family's end-of-reply token plus the checkpoint's eos ids) and report, per completion, the mean of the
sampled tokens' RAW log-probs: log_softmax of the model's logits before temperature, top-p or any other processor.
That is vLLM's default (`logprobs_mode="raw_logprobs"`, with `logprobs=0` returning the sampled token's value) and
HF's `output_logits`; it is the model's own likelihood of the response, which is what LeanPO's rbar measures. The
stop token, when generation ends on one, is part of `token_ids`, `num_tokens` and the mean (it is scored in training
too); it is not part of `text`.

    engine = open_engine("/tmp/toy-qwen2vl")                       # vLLM if it imports, else transformers
    [[c]] = engine.generate([Request(prompt, frames, meta, max_tokens=64, seed=1)])
    engine.close()

vLLM on CPU runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, executor "uni"): an engine then starts in ~3 s after
the ~10 s import instead of spawning an engine-core process, there is one process to own and kill, and no
`__main__` guard is needed. Side effect: vLLM's CPU worker binds OpenMP threads and replaces `torch.set_num_threads`
by a no-op for the whole process, so run other torch work of the same process before opening the engine, or in
another process. On GPU vLLM keeps its own engine-core process and, with tensor_parallel_size > 1, its multiprocess
executor. Seeded sampling is reproducible per request in both backends (see `Request.seed`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from leanpo_core import models


@dataclass(frozen=True)
class Request:
    """One prompt to complete `n` times. prompt: the full chat prompt from `FamilyAdapter.build_prompt`.

    seed: the request's own random stream, independent of what else is in the batch; completion i of n is drawn
    with seed + i (vLLM's convention for n > 1, followed by the transformers backend). temperature 0 is greedy.
    """

    prompt: str
    frames: np.ndarray                  # (T, H, W, 3) uint8, already sampled
    meta: dict[str, Any]                # `models.video_metadata(...)` of those frames
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    tag: Any = field(default=None, compare=False)  # caller's bookkeeping, returned untouched


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    mean_logprob: float                 # mean of the sampled tokens' raw log-probs (generation time)
    num_tokens: int
    finish_reason: str                  # "stop" | "length"
    prompt_token_ids: tuple[int, ...] = ()  # the prompt as the model saw it (video placeholder expanded)


class Engine(Protocol):
    backend: str                        # "vllm" | "transformers"
    adapter: models.FamilyAdapter       # builds the prompts this engine expects
    processor: Any                      # the checkpoint's processor (chat template, tokenizer)

    def generate(self, requests: Sequence[Request]) -> list[list[Completion]]:
        """All requests in one batch; result[i] holds request i's n completions."""

    def close(self) -> None:
        """Release the model and any worker processes."""


def stop_token_ids(model_dir: str, tokenizer, adapter: models.FamilyAdapter) -> list[int]:
    """The ids generation ends on: the family's end-of-reply token, the tokenizer's eos and the checkpoint's
    `generation_config.json` eos ids (real Qwen2-VL lists <|endoftext|> there too). Both backends use this set."""
    ids = [tokenizer.convert_tokens_to_ids(adapter.end_of_reply), tokenizer.eos_token_id]
    config = Path(model_dir) / "generation_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos]
    return sorted({int(i) for i in ids if i is not None})


def _completion(tokenizer, token_ids: Sequence[int], logprobs: Sequence[float], stop_ids: set[int],
                prompt_ids: Sequence[int]) -> Completion:
    """One completion from sampled ids and their raw log-probs; text decoded the same way for both backends."""
    token_ids = tuple(int(t) for t in token_ids)
    stopped = bool(token_ids) and token_ids[-1] in stop_ids
    body = token_ids[:-1] if stopped else token_ids
    mean = float(np.mean(logprobs)) if len(logprobs) else math.nan
    return Completion(text=tokenizer.decode(list(body), skip_special_tokens=True), token_ids=token_ids,
                      mean_logprob=mean, num_tokens=len(token_ids), finish_reason="stop" if stopped else "length",
                      prompt_token_ids=tuple(int(t) for t in prompt_ids))


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _resolve_dtype(dtype: str) -> str:
    """auto: bfloat16 on GPU, float32 on CPU (vLLM's CPU kernels and the toy models are validated in fp32)."""
    return ("bfloat16" if _on_gpu() else "float32") if dtype == "auto" else dtype


class _DropRepeatedWarning(logging.Filter):
    """vLLM's CPU worker logs a warning on every blocked `torch.set_num_threads` call (dozens per batch)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torch.set_num_threads" not in record.getMessage()


class VllmEngine:
    """vLLM backend: every request of a `generate` call goes to the engine in one `LLM.generate` (one per frame
    count for families whose adapter sets `vllm_one_frame_count_per_batch`)."""

    backend = "vllm"

    def __init__(self, model: str, *, dtype: str = "auto", seed: int = 0, max_model_len: int = 4096,
                 max_num_seqs: int = 16, tensor_parallel_size: int = 1, **llm_kwargs: Any):
        on_cpu = not _on_gpu()
        if on_cpu:
            # GiB of KV cache; unset, vLLM sizes it from free memory, which other processes of a small host need
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if on_cpu and tensor_parallel_size == 1:
            # Read when the engine is built: set before constructing LLM so the engine core runs in this process.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            llm_kwargs.setdefault("distributed_executor_backend", "uni")
        if on_cpu:
            llm_kwargs.setdefault("enforce_eager", True)  # no graph capture on CPU; compiling costs minutes
        llm_kwargs.setdefault("logprobs_mode", "raw_logprobs")  # vLLM's default, pinned: the meaning of mean_logprob
        from transformers import AutoProcessor
        from vllm import LLM

        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_DropRepeatedWarning())
        self.model = str(model)
        self.adapter = models.adapter_for(self.model)
        self.processor = AutoProcessor.from_pretrained(self.model)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.stop_ids = stop_token_ids(self.model, self.tokenizer, self.adapter)
        kwargs = self.adapter.engine_kwargs(
            model=self.model, dtype=_resolve_dtype(dtype), seed=seed, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, tensor_parallel_size=tensor_parallel_size, **llm_kwargs)
        kwargs.pop("load_format", None)
        self.llm = LLM(load_format="safetensors", **kwargs)  # weights as safetensors only: no pickled .bin files

    def prompt_input(self, request: Request) -> dict[str, Any]:
        """The vLLM prompt dict of a request: text prompt plus the frames and metadata exactly as given."""
        return {"prompt": request.prompt, "multi_modal_data": self.adapter.vllm_video_input(request.frames,
                                                                                           request.meta)}

    def sampling_params(self, request: Request):
        from vllm import SamplingParams

        # logprobs=0: only the sampled token's log-prob, raw (logprobs_mode default "raw_logprobs")
        return SamplingParams(n=request.n, temperature=request.temperature, top_p=request.top_p,
                              max_tokens=request.max_tokens, logprobs=0, seed=request.seed,
                              stop_token_ids=self.stop_ids)

    def _drop_unfinished(self) -> None:
        """After a failed `LLM.generate`, vLLM's engine still holds the batch's requests, and the next call would
        run them again: every later call (a question retried alone, the next shard) failed on the same item, and
        with many left the scheduler spun for minutes. They are aborted here."""
        engine = self.llm.llm_engine
        pending = list(engine.output_processor.request_states)
        if pending:
            engine.abort_request(pending, internal=True)

    def generate(self, requests: Sequence[Request]) -> list[list[Completion]]:
        if not requests:
            return []
        groups = [list(range(len(requests)))]
        if self.adapter.vllm_one_frame_count_per_batch:
            by_count: dict[int, list[int]] = {}
            for i, request in enumerate(requests):
                by_count.setdefault(len(request.frames), []).append(i)
            groups = list(by_count.values())
        stop, results = set(self.stop_ids), [None] * len(requests)
        for group in groups:
            try:
                outputs = self.llm.generate([self.prompt_input(requests[i]) for i in group],
                                            [self.sampling_params(requests[i]) for i in group], use_tqdm=False)
            except Exception:
                self._drop_unfinished()
                raise
            for i, out in zip(group, outputs):
                completions = []
                for sample in sorted(out.outputs, key=lambda s: s.index):
                    ids = list(sample.token_ids)
                    logprobs = [step[token].logprob for token, step in zip(ids, sample.logprobs or [])]
                    completions.append(_completion(self.tokenizer, ids, logprobs, stop, out.prompt_token_ids))
                results[i] = completions
        return results

    def close(self) -> None:
        import gc

        from vllm.distributed import cleanup_dist_env_and_memory

        self.llm = None
        gc.collect()
        cleanup_dist_env_and_memory()


class HFEngine:
    """transformers backend: `model.generate` request by request, completion by completion (seed + i).

    One sequence at a time keeps results independent of batch composition, avoids padding video batches, and avoids
    `num_return_sequences`, which transformers 5.19 breaks for LLaVA-NeXT-Video (its video features come back empty);
    it is the fallback where vLLM is unavailable, not the fast path.
    """

    backend = "transformers"

    def __init__(self, model: str, *, dtype: str = "auto", seed: int = 0, device: str | None = None,
                 max_model_len: int = 4096, **_: Any):
        import torch

        self.device = device or ("cuda" if _on_gpu() else "cpu")
        self.max_model_len = max_model_len
        self.model_dir = str(model)
        self.model, self.processor, self.adapter = models.load_model(
            self.model_dir, dtype=getattr(torch, _resolve_dtype(dtype)), device=self.device)
        self.model.eval()
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.stop_ids = stop_token_ids(self.model_dir, self.tokenizer, self.adapter)

    def generation_config(self, request: Request, prompt_len: int):
        """Every sampling knob set explicitly, so the checkpoint's generation_config.json cannot add a top-k or a
        repetition penalty that vLLM (given explicit SamplingParams) would not apply; like vLLM, generation ends
        at max_model_len tokens in all."""
        from transformers import GenerationConfig

        sample = request.temperature > 0
        knobs = dict(temperature=request.temperature, top_p=request.top_p, top_k=0) if sample else {}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        return GenerationConfig(do_sample=sample, repetition_penalty=1.0, max_new_tokens=min(request.max_tokens, self.max_model_len - prompt_len),
                                min_new_tokens=0, eos_token_id=self.stop_ids, pad_token_id=pad, output_logits=True,
                                return_dict_in_generate=True, **knobs)

    def generate(self, requests: Sequence[Request]) -> list[list[Completion]]:
        return [self._generate_one(r) for r in requests]

    def _generate_one(self, request: Request) -> list[Completion]:
        import torch

        inputs = self.adapter.encode(self.processor, request.frames, request.prompt, None, meta=request.meta)
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        prompt_ids = inputs["input_ids"][0].tolist()
        if len(prompt_ids) >= self.max_model_len:  # vLLM rejects such a prompt too (VLLMValidationError)
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens, max_model_len is {self.max_model_len}")
        config = self.generation_config(request, len(prompt_ids))
        devices = [torch.cuda.current_device()] if self.device.startswith("cuda") else []
        stop = set(self.stop_ids)
        completions = []
        for i in range(request.n):
            # A private RNG stream per completion, seeded like vLLM's per-request generator; global state untouched
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(request.seed + i)
                out = self.model.generate(**inputs, generation_config=config)
            ids = out.sequences[0, len(prompt_ids):].tolist()
            # out.logits: one (1, V) tensor per step, before any processor: log_softmax gives vLLM's raw log-probs
            logprobs = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)
            picked = logprobs[torch.arange(len(ids)), torch.tensor(ids, dtype=torch.long)].tolist()
            completions.append(_completion(self.tokenizer, ids, picked, stop, prompt_ids))
        return completions

    def close(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def vllm_available() -> bool:
    with contextlib.suppress(Exception):
        import vllm  # noqa: F401

        return True
    return False


def open_engine(model: str, backend: str = "auto", *, dtype: str = "auto", seed: int = 0, max_model_len: int = 4096,
                max_num_seqs: int = 16, tensor_parallel_size: int = 1, max_tokens_hint: int | None = None,
                **kw: Any) -> Engine:
    """Start a generation engine for `model` (a local folder or hub id).

    backend: "vllm", "transformers", or "auto" (vLLM wherever `import vllm` works). dtype "auto": bf16 on GPU, fp32
    on CPU. max_tokens_hint: the largest `max_tokens` callers will ask for; it must leave room for a prompt within
    max_model_len (checked here, before minutes of work, not mid-run). Extra keywords go to `vllm.LLM` (vLLM) or are
    ignored (transformers, except `device`).
    """
    if max_tokens_hint is not None and max_tokens_hint >= max_model_len:
        raise ValueError(f"max_tokens_hint ({max_tokens_hint}) leaves no room for a prompt within max_model_len "
                         f"({max_model_len}); raise max_model_len or lower the generation limit")
    if backend == "auto":
        backend = "vllm" if vllm_available() else "transformers"
    if backend == "vllm":
        return VllmEngine(model, dtype=dtype, seed=seed, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                          tensor_parallel_size=tensor_parallel_size, **kw)
    if backend == "transformers":
        if tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 needs the vLLM backend")
        return HFEngine(model, dtype=dtype, seed=seed, max_model_len=max_model_len, **kw)
    raise ValueError(f"backend must be 'auto', 'vllm' or 'transformers', got {backend!r}")
