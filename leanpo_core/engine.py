"""Generation engines: one interface, two backends (vLLM, the default wherever `vllm` imports; transformers).

INTERFACE DRAFT — the implementation is being written; keep these names and fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class Request:
    """One prompt to complete `n` times. prompt: the full chat prompt from `FamilyAdapter.build_prompt`."""

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


class Engine(Protocol):
    def generate(self, requests: Sequence[Request]) -> list[list[Completion]]:
        """All requests in one batch; result[i] holds request i's n completions."""

    def close(self) -> None:
        """Release the model and any worker processes."""
