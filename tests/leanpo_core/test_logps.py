"""Response-only log-probs (leanpo_core.logps) against the naive full-logits computation."""

import pytest
import torch
from torch import nn

from leanpo_core.logps import (
    IGNORE_INDEX, model_response_logps, naive_response_logps, response_logps, token_logps,
)
from leanpo_core.loss import leanpo_loss


def toy_batch(seed: int = 0, b: int = 3, t: int = 12, h: int = 16, v: int = 50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(h, v, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g, dtype=torch.float64))
    labels = torch.full((b, t), IGNORE_INDEX)
    for i, (start, stop) in enumerate([(5, 12), (3, 9), (8, 12)][:b]):  # response spans; the rest is prompt/padding
        labels[i, start:stop] = torch.randint(0, v, (stop - start,), generator=g)
    return hidden, head, labels


@pytest.mark.parametrize("chunk_size", [0, 7, 16, 50])
def test_lean_equals_naive_values_and_gradients(chunk_size):
    hidden, head, labels = toy_batch()
    sums, counts = response_logps(hidden, labels, head, chunk_size)
    gh, gw = torch.autograd.grad(sums.sum() * 0.7 - sums[0], (hidden, head.weight))
    naive_sums, naive_counts = naive_response_logps(head(hidden), labels)
    nh, nw = torch.autograd.grad(naive_sums.sum() * 0.7 - naive_sums[0], (hidden, head.weight))
    assert counts.tolist() == naive_counts.tolist() == [7, 6, 4]
    torch.testing.assert_close(sums, naive_sums, atol=1e-10, rtol=0)
    torch.testing.assert_close(gh, nh, atol=1e-10, rtol=0)
    torch.testing.assert_close(gw, nw, atol=1e-10, rtol=0)


def test_chunked_gradcheck():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 4, 8, 8])
    assert torch.autograd.gradcheck(lambda r, w: token_logps(r, w, targets, chunk_size=4), (rows, weight))


def test_prompt_positions_never_change_the_loss():
    """Hidden states (hence logits) at positions that predict no response token do not enter the loss at all."""
    hidden, head, labels = toy_batch()

    def loss_of(hs):
        s, c = response_logps(hs, labels, head)
        return leanpo_loss(s[:2], c[:2].double(), s[1:], c[1:].double()).loss

    base = loss_of(hidden)
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    perturbed = hidden.detach().clone()
    perturbed[~scored] += 100 * torch.randn_like(perturbed[~scored])
    assert loss_of(perturbed).item() == base.item()
    grad = torch.autograd.grad(base, hidden)[0]
    assert grad[~scored].abs().max().item() == 0.0


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_next_video", "llava_onevision"])
@pytest.mark.parametrize("chunk_size", [0, 97])
def test_toy_models_lean_equals_naive(family, chunk_size, loaded, video):
    """On each family's toy model and real video frames: backbone + response-only head == full logits, to 1e-5."""
    model, processor, adapter = loaded(family)
    frames, meta = video
    prompt = adapter.build_prompt(processor, "What moves in the video?")
    inputs = adapter.encode(processor, frames, prompt, " A red square moves left.", meta=meta)
    sums, counts = model_response_logps(model, inputs, chunk_size)
    naive_sums, naive_counts = naive_response_logps(model(**inputs).logits, inputs["labels"])
    assert counts.tolist() == naive_counts.tolist()
    torch.testing.assert_close(sums, naive_sums, atol=1e-5, rtol=0)
