"""The likelihood scorer's device and precision, shared by the reflect and evaluate stages.

Both stages load a model only to compute rbar (the mean response-token log-prob, `logps.model_response_logps`).
`ReflectConfig` / `EvaluateConfig` name where (`device`) and in what precision (`scoring_precision`) that happens;
this module turns the two fields into a torch device and weight dtype, and loads the model so:
  fp32                        fp32 weights and activations;
  bf16-weights-fp32-softmax   bf16 weights and activations (half the memory, tensor-core math); the output
                              projection's logits are cast to fp32 before the log-softmax, and the per-sequence sums
                              accumulate in fp32 (`logps._accumulation_dtype`);
  auto                        bf16-weights-fp32-softmax on a CUDA device with native bf16 (compute capability 8.0+),
                              fp32 anywhere else (CPU: measured 2-4x slower in bf16 here, and it only adds error).
How often the trust filter's decision changes between fp32 and bf16 weights is measured in docs/operations.md
("Scoring precision"), with bench/scoring_precision_bench.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

ScoringPrecision = Literal["fp32", "bf16-weights-fp32-softmax", "auto"]
PRECISIONS: tuple[str, ...] = get_args(ScoringPrecision)


def resolve_device(device: str) -> str:
    """A config's `device` ("auto", "cpu", "cuda") as a torch device string; auto: cuda when available."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def weights_dtype(precision: str, device: str):
    """The torch dtype the scorer's weights load in, for a `scoring_precision` and a device ("auto" allowed)."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"scoring_precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16-weights-fp32-softmax":
        return torch.bfloat16
    on_cuda = resolve_device(device).startswith("cuda") and torch.cuda.is_available()
    return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32


def precision_label(precision: str, device: str) -> str:
    """What `precision` resolves to on `device`: "fp32" or "bf16-weights-fp32-softmax" (for hashes and logs)."""
    import torch

    return "fp32" if weights_dtype(precision, device) == torch.float32 else "bf16-weights-fp32-softmax"


def load_scoring_model(path_or_hub_id: str | Path, precision: str, device: str = "auto"):
    """(model in eval mode, processor, adapter) of the scoring model, weights in `weights_dtype(precision, device)`
    on `resolve_device(device)`."""
    from leanpo_core import models

    model, processor, adapter = models.load_model(path_or_hub_id, dtype=weights_dtype(precision, device),
                                                  device=resolve_device(device))
    return model.eval(), processor, adapter
