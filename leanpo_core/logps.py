"""Response-only log-probabilities: logits exist only at response positions, optionally one vocabulary chunk at a time.

A video prompt holds thousands of tokens; full-vocabulary logits over it cost gigabytes and are thrown away, since
the reward and the SFT term only read response tokens (docs/method.md section 7). Here the language model's last hidden
states are gathered at the positions that predict response tokens, and only those rows meet the output projection.
With `chunk_size > 0` even those logits are never held whole: a custom autograd function streams the vocabulary in
chunks forward (running log-sum-exp) and recomputes each chunk in backward, so memory is O(N * chunk) not O(N * V).

Labels follow the Hugging Face convention: -100 marks positions that are not scored (prompt, video, padding);
labels[b, t] is predicted by hidden[b, t - 1].
"""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor
IGNORE_INDEX = -100  # the label of positions that are not scored (prompt, padding): transformers' convention


def response_positions(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(batch index, hidden position, target token) for every scored token; labels: (B, T)."""
    shifted = labels[:, 1:]
    batch, pos = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    return batch, pos, shifted[batch, pos]


def _accumulation_dtype(t: Tensor) -> torch.dtype:
    """Softmax statistics in at least fp32 (bf16 log-sum-exp over a large vocabulary is too coarse)."""
    return torch.promote_types(t.dtype, torch.float32)


class _ChunkedTokenLogProb(torch.autograd.Function):
    """log softmax(h W^T)[target] with the vocabulary streamed in chunks, forward and backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
        acc = _accumulation_dtype(hidden)
        h = hidden.to(acc)
        lse = torch.full((h.shape[0],), float("-inf"), device=h.device, dtype=acc)
        with torch.autocast(h.device.type, enabled=False):  # else autocast runs h @ w.T (CPU: logsumexp too) in bf16
            for start in range(0, weight.shape[0], chunk_size):
                logits = h @ weight[start:start + chunk_size].to(acc).T
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
        target_logits = (h * weight[targets].to(acc)).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        return target_logits - lse

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        acc = lse.dtype
        h, g_out = hidden.to(acc), grad_out.to(acc)
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        rows = torch.arange(h.shape[0], device=h.device)
        with torch.autocast(h.device.type, enabled=False):  # a backward called inside autocast: same fp32 softmax
            for start in range(0, weight.shape[0], ctx.chunk_size):
                w = weight[start:start + ctx.chunk_size].to(acc)
                # d/dlogits of (logit[target] - lse) = onehot(target) - softmax
                g = -torch.exp(h @ w.T - lse[:, None]) * g_out[:, None]
                in_chunk = (targets >= start) & (targets < start + w.shape[0])
                g[rows[in_chunk], targets[in_chunk] - start] += g_out[in_chunk]
                if grad_h is not None:
                    grad_h += g @ w
                if grad_w is not None:
                    grad_w[start:start + w.shape[0]] = g.T @ h
        return (
            grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            None,
            None,
        )


def token_logps(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 0) -> Tensor:
    """Log-prob of each target under logits = hidden @ weight.T. hidden: (N, H), weight: (V, H), targets: (N,)."""
    if chunk_size and chunk_size < weight.shape[0]:
        return _ChunkedTokenLogProb.apply(hidden, weight, targets, chunk_size)
    logits = (hidden @ weight.T).to(_accumulation_dtype(hidden))
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def response_logps(
    hidden_states: Tensor, labels: Tensor, lm_head: nn.Module, chunk_size: int = 0
) -> tuple[Tensor, Tensor]:
    """Per-sequence (sum of response-token log-probs, response token count), each (B,).

    hidden_states: (B, T, H) last hidden states of the language model; labels: (B, T) with -100 off-response;
    lm_head: the output projection (a bias-free Linear, as in every supported family).
    """
    batch, pos, targets = response_positions(labels)
    return scored_logps(hidden_states, lm_head, batch, pos, targets, batch, labels.shape[0], chunk_size)


def scored_logps(hidden_states: Tensor, lm_head: nn.Module, rows: Tensor, positions: Tensor, targets: Tensor,
                 sequences: Tensor, num_sequences: int, chunk_size: int = 0) -> tuple[Tensor, Tensor]:
    """(sum of log-probs, token count) per output sequence, each (num_sequences,): token i is `targets[i]`,
    predicted by hidden_states[rows[i], positions[i]], and counts toward sequence `sequences[i]` (one row of
    hidden states may hold several sequences, as a prefix-shared pair does)."""
    if getattr(lm_head, "bias", None) is not None:
        raise ValueError("response log-probs expect a bias-free output projection")
    logps = token_logps(hidden_states[rows, positions], lm_head.weight, targets, chunk_size)
    sums = torch.zeros(num_sequences, dtype=logps.dtype, device=logps.device).index_add(0, sequences, logps)
    return sums, torch.bincount(sequences, minlength=num_sequences)


def naive_response_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The same quantity from full-sequence logits (B, T, V): the reference the lean path is checked against."""
    logp = torch.log_softmax(logits[:, :-1].to(_accumulation_dtype(logits)), dim=-1)
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    picked = logp.gather(-1, shifted.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def naive_pair_logps(model: nn.Module, batch: dict) -> tuple[Tensor, Tensor]:
    """Baseline pair path: one forward of a two-row pair batch's 2B sequences, each with its own copy of its video,
    full-vocabulary logits over every position; (sums, counts) (2B,) as the lean path gives them."""
    from leanpo_core import models

    tokens = {k: v for k, v in batch.items() if models.is_per_token(k) and k != "labels"}
    logits = model(**tokens, **models.repeat_videos(models.video_inputs(batch), 2)).logits
    return naive_response_logps(logits, batch["labels"])


def model_response_logps(model: nn.Module, inputs: dict, chunk_size: int = 0) -> tuple[Tensor, Tensor]:
    """Score only the response tokens of `inputs` (an adapter's `encode` output, with labels); no full logits."""
    from leanpo_core.models import backbone_hidden_states, output_projection

    hidden = backbone_hidden_states(model, inputs)
    return response_logps(hidden, inputs["labels"], output_projection(model), chunk_size)
