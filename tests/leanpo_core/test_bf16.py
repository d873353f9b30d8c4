"""bf16 on CPU: training runs, the lean pair path against the naive one, and chunked log-probs, all in bf16.

`precision: bf16` makes the Trainer run the forward under `torch.autocast("cpu", dtype=torch.bfloat16)` over fp32
weights (on GPU the same with "cuda"): matmuls take bf16-rounded inputs and round their outputs to bf16, the residual
stream and the optimizer stay fp32. Tolerances below follow from bf16's unit roundoff U = 2^-8 (8-bit significand:
round-to-nearest moves x by at most U|x|, one ulp is at most 2U|x|) and fp32's EPS = 2^-24; each test states how,
and checks that a deliberate error of the kind it guards against lands outside its tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from leanpo_core import io, logps, models, schemas, train
from leanpo_core.config import TrainConfig

from .conftest import FAMILIES
from .test_train import _config, _pair_batch, pair_data  # noqa: F401  (pair_data is a fixture)

U = 2.0 ** -8  # bf16 unit roundoff
EPS = 2.0 ** -24  # fp32 unit roundoff
BF16 = torch.bfloat16


def _autocast():
    return torch.autocast("cpu", dtype=BF16)


def _trainable(name: str) -> bool:
    """What `train._freeze_vision` leaves trainable: the language model and the LM head."""
    return "language_model" in name or name.startswith("lm_head")


# ---------------------------------------------------------------- training runs


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_training_run(family, pair_data, toy_dirs, tmp_path, monkeypatch, video):  # noqa: F811
    """`precision: bf16` on each family: autocast really runs in bf16, the loss is finite and falls over 6 steps on
    one fixed batch (all 4 kept pairs every step), the vision tower and projector stay frozen, weights stay fp32,
    and the exported folder reloads to the trained weights and scores finite log-probs."""
    original_load = models.load_model
    seen: dict[str, set] = {"language": set(), "vision": set()}

    def load_and_watch(*args, **kwargs):
        model, processor, adapter = original_load(*args, **kwargs)
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        language = next(m for n, m in linears if "language_model" in n)
        vision = next(m for n, m in linears if not _trainable(n))
        for part, module in (("language", language), ("vision", vision)):
            module.register_forward_hook(
                lambda mod, args, out, part=part: seen[part].add((out.dtype, torch.is_autocast_enabled("cpu"))))
        return model, processor, adapter

    monkeypatch.setattr(models, "load_model", load_and_watch)
    before, _, adapter = original_load(toy_dirs[family])
    config = _config(toy_dirs[family], precision="bf16", max_steps=6, per_device_batch_size=4, learning_rate=5e-3,
                     lr_scheduler="constant", gradient_checkpointing=True, save_steps=100)
    result = train.train(config, *pair_data, str(tmp_path / "run"))

    # Autocast ran: the watched Linears (fp32 weights) returned bf16 inside an enabled autocast region.
    assert seen["language"] == {(BF16, True)} and seen["vision"] == {(BF16, True)}, seen
    trained = result.model
    assert all(p.dtype == torch.float32 for p in trained.parameters())

    assert result.steps == 6 and math.isfinite(result.final_loss)
    table = io.read_table(result.metrics_uri, schemas.TRAIN_METRICS)
    assert table.column("step").to_pylist() == [1, 2, 3, 4, 5, 6]
    losses = table.column("loss").to_pylist()
    assert all(math.isfinite(v) for v in losses), losses
    # Step 1 is scored before any update, step 6 after five; seen: ~4.5 -> ~2.6 in every family (fp32 alike).
    assert losses[-1] < losses[0] - 1.0, losses

    start, end = dict(before.named_parameters()), dict(trained.named_parameters())
    assert start.keys() == end.keys()
    frozen = [n for n in start if not _trainable(n)]
    assert frozen and all(torch.equal(start[n], end[n]) for n in frozen)
    assert any(not torch.equal(start[n], end[n]) for n in start if "language_model" in n)

    reloaded, processor, _ = original_load(result.model_dir)
    state = reloaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.state_dict().items())
    frames, meta = video
    inputs = adapter.encode(processor, frames[:4], adapter.build_prompt(processor, "What moves?"), " it moves left")
    as_bf16, _, _ = original_load(result.model_dir, dtype=BF16)  # as a bf16 scorer (or vLLM) would hold it
    for scorer in (reloaded, as_bf16):
        with torch.no_grad():
            sums, counts = logps.model_response_logps(scorer.eval(), inputs)
        assert counts.item() > 0 and sums.dtype == torch.float32 and bool(torch.isfinite(sums).all()), sums


# ---------------------------------------------------------------- lean vs naive pair path


def _projection_bound(model, adapter, batch) -> torch.Tensor:
    """(2B,) per-sequence sum over response tokens of tau = 2U (2 S + M) (see the test), from the fp32 model."""
    with torch.no_grad():
        hidden = adapter.shared_video_hidden_states(model, batch, copies=2)
    rows, pos, _ = logps.response_positions(batch["labels"])
    h, w = hidden[rows, pos].double(), models.output_projection(model).weight.double()
    s = (h.abs() @ w.abs().T).max(-1).values  # S: largest sum_i |h_i W_ji| of each token's logits
    m = (h @ w.T).abs().max(-1).values  # M: largest |z_j|
    tau = 2 * U * (2 * s + m)
    return torch.zeros(batch["labels"].shape[0], dtype=torch.float64).index_add(0, rows, tau)


@pytest.mark.parametrize("family", FAMILIES)
def test_lean_matches_naive_in_bf16(family, loaded, video):
    """Under bf16 autocast the lean pair path (unchunked, and chunked) gives the naive path's counts, and its
    log-prob sums within a per-sequence tolerance sum_t tau_t, tau_t = 2U (2 S_t + M_t).

    Derivation. Both paths run the same backbone ops on the same values (the vision tower on B videos vs 2B copies
    of them), so the last hidden states h agree up to fp32 accumulation order (seen: bit-equal, or 1e-5 apart in the
    sums); they differ in how the output projection z = W h is evaluated. The naive path and the unchunked lean
    path round h and W to bf16 and z to bf16 (fp32 accumulation): the same input roundings, so at most one output
    ulp apart, |dz_j| <= 2U |z_j| <= 2U M. The chunked lean path is meant to project in fp32 (`logps`
    upcasts): against a bf16 evaluation, rounding h and W moves z_j by <= 2U sum_i |h_i W_ji| <= 2U S and rounding
    z_j by <= U M, so |dz_j| <= U (2 S + M). As S >= M, both cases are |dz_j| <= U (2 S + M). log p_t = z_t -
    logsumexp(z) has gradient of 1-norm <= 2 in z, hence |d log p_t| <= tau_t = 2U (2 S_t + M_t) per token and a
    sequence moves by at most the sum of its tokens' tau_t (S_t, M_t from the fp32 model, per token). The toy
    models have S ~ 1.3, M ~ 0.8: tau ~ 0.026 per token, ~0.045 for the 2-token response and ~0.2 for the 9-token
    one. Seen: unchunked 0 to 8e-6, chunked 3e-4 to 0.023.

    Not loose enough to hide a real bug: a dropped token changes the counts and moves its sum by |log p| ~ log V ~ 7;
    an off-by-one shift (each response token scored from the hidden state one position too early) moves some
    sequence's sum past its tolerance (seen: 2 to 4 of the 4 sequences, up to 3-11x), checked below. The bf16 naive
    sums also differ from the fp32 ones (autocast did run). The prefix-shared rows (one `[prompt | chosen |
    rejected]` row per pair) give each response token the same keys and positions, so the same bound applies.
    """
    model, processor, adapter = loaded(family)
    texts = [("What moves?", " a red square moves left", " a blue circle"),
             ("What colour is it?", " red", " it is green and large and slow")]
    batch = _pair_batch(processor, adapter, video, texts)
    joined = _pair_batch(processor, adapter, video, texts, prefix_sharing=True)
    tolerance = _projection_bound(model, adapter, batch)
    with torch.no_grad():
        fp32_sums, _ = train.pair_logps(model, adapter, batch)
        with _autocast():
            naive_sums, naive_counts = logps.naive_pair_logps(model, batch)
            lean = {chunk: train.pair_logps(model, adapter, batch, chunk_size=chunk) for chunk in (0, 97)}
            lean.update({f"prefix-shared, chunk {chunk}": train.pair_logps(model, adapter, joined, chunk_size=chunk)
                         for chunk in (0, 97)})
            hidden = adapter.shared_video_hidden_states(model, batch, copies=2)
            head = models.output_projection(model)
            shifted, shifted_counts = logps.response_logps(hidden.roll(1, dims=1), batch["labels"], head)
            dropped_labels = batch["labels"].clone()
            dropped_labels[0, (dropped_labels[0] != logps.IGNORE_INDEX).nonzero().max()] = logps.IGNORE_INDEX
            dropped, dropped_counts = logps.response_logps(hidden, dropped_labels, head)

    assert naive_sums.dtype == torch.float32 and not torch.equal(naive_sums, fp32_sums)  # bf16 changed something
    config = TrainConfig(model="x", smoothing_threshold=math.inf)  # every pair gated: both smoothing terms live
    naive_loss = train.objective_loss(config, naive_sums, naive_counts, batch).loss.item()
    half, n = batch["labels"].shape[0] // 2, naive_counts.double()
    # The loss moves by at most (beta / B) sum_i |dDelta_i| (each pair's smoothed log-sigmoid term has slope <= beta
    # in Delta = rbar_w - rbar_l) plus sft_weight * (chosen sums' tolerance) / (chosen tokens).
    per_seq = tolerance / n
    loss_tolerance = (config.effective_beta / half * (per_seq[:half] + per_seq[half:]).sum()
                      + config.sft_weight * tolerance[:half].sum() / n[:half].sum()).item()
    for chunk, (sums, counts) in lean.items():
        assert torch.equal(counts, naive_counts), chunk
        error = (sums.double() - naive_sums.double()).abs()
        assert bool((error <= tolerance).all()), (chunk, error.tolist(), tolerance.tolist())
        loss = train.objective_loss(config, sums, counts, batch).loss.item()
        assert abs(loss - naive_loss) <= loss_tolerance, (chunk, loss, naive_loss, loss_tolerance)

    # Deliberate errors land outside the tolerance.
    assert torch.equal(shifted_counts, naive_counts)
    shift_error = (shifted.double() - naive_sums.double()).abs()
    assert bool((shift_error > tolerance).any()), (shift_error.tolist(), tolerance.tolist())
    assert dropped_counts[0] == naive_counts[0] - 1
    assert abs(dropped[0].item() - naive_sums[0].item()) > tolerance[0].item()


# ---------------------------------------------------------------- chunked vs unchunked log-probs

N_TOKENS, HIDDEN, VOCAB, CHUNK = 64, 64, 2048, 128


def _projection_problem(dtype: torch.dtype, seed: int = 0):
    """hidden (64, 64), weight (2048, 64), targets (64,): logits of std ~2 (|z| up to ~8, logsumexp ~9.5)."""
    g = torch.Generator().manual_seed(seed)
    hidden = (2 * torch.randn(N_TOKENS, HIDDEN, generator=g)).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN ** 0.5).to(dtype)
    targets = torch.randint(0, VOCAB, (N_TOKENS,), generator=g)
    return hidden, weight, targets


def _exact(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def _fp32_tolerance(hidden, weight, chunks: int) -> torch.Tensor:
    """Per-token bound on fp32 log-softmax statistics: EPS (2 H S + V + (chunks + 2) |lse|).

    fp32 sums of H products move each logit by <= H EPS S (S = max_j sum_i |h_i W_ji|), which reaches log p twice
    (target logit and the log-sum-exp's weighted mean); the V exponentials summed in fp32 move the log-sum-exp by
    <= V EPS; the per-chunk log-add-exp and the final subtraction each round once, <= EPS |lse|.
    """
    h, w = hidden.double(), weight.double()
    s = (h.abs() @ w.abs().T).max(-1).values
    lse = torch.logsumexp(h @ w.T, dim=-1).abs()
    return EPS * (2 * HIDDEN * s + VOCAB + (chunks + 2) * lse)


def test_chunked_and_unchunked_logps_keep_fp32_statistics_on_bf16_inputs(monkeypatch):
    """bf16 hidden states and weights (a model held in bf16): both paths return fp32 log-probs whose softmax
    statistics are fp32-accurate, and they agree with each other within 2U M + fp32 noise.

    The chunked path upcasts before its matmuls: products of bf16 numbers are exact in fp32, so it must match the
    fp64 log-softmax of the exact logits within the fp32 bound of `_fp32_tolerance` (~2e-4 here). The unchunked
    path's matmul returns bf16 logits (rounded once, <= U |z_j|) and must match the fp64 log-softmax of THOSE logits
    within the same bound. Between the two, only that rounding differs: |d log p_t| <= 2 U M_t (M_t = max_j |z_tj|,
    gradient 1-norm <= 2), ~0.06 here.

    Not loose: with bf16 statistics (`_accumulation_dtype` returning the input's dtype: log-sum-exp, log-softmax
    in bf16) both paths miss their reference by more than 10x the fp32 bound (seen: ~170x and ~540x), and the
    chunked one leaves the 2U M band around the unchunked fp32-statistics result (seen: ~2x).
    """
    hidden, weight, targets = _projection_problem(BF16)
    exact = _exact(hidden.double() @ weight.double().T, targets)
    rounded = _exact(hidden @ weight.T, targets)  # the unchunked path's own bf16 logits, exact statistics
    chunks = math.ceil(VOCAB / CHUNK)
    tol_chunked, tol_unchunked = _fp32_tolerance(hidden, weight, chunks), _fp32_tolerance(hidden, weight, 1)

    chunked = logps.token_logps(hidden, weight, targets, chunk_size=CHUNK)
    unchunked = logps.token_logps(hidden, weight, targets)
    assert chunked.dtype == unchunked.dtype == torch.float32
    assert bool(((chunked.double() - exact).abs() <= tol_chunked).all())
    assert bool(((unchunked.double() - rounded).abs() <= tol_unchunked).all())
    m = (hidden.double() @ weight.double().T).abs().max(-1).values
    assert bool(((chunked.double() - unchunked.double()).abs() <= 2 * U * m + tol_chunked + tol_unchunked).all())
    assert not torch.equal(chunked, unchunked)  # the bf16 rounding of the unchunked logits is there

    monkeypatch.setattr(logps, "_accumulation_dtype", lambda t: t.dtype)  # deliberate: bf16 statistics
    bad_chunked = logps.token_logps(hidden, weight, targets, chunk_size=CHUNK)
    bad_unchunked = logps.token_logps(hidden, weight, targets)
    assert ((bad_chunked.double() - exact).abs() / tol_chunked).max() > 10
    assert ((bad_unchunked.double() - rounded).abs() / tol_unchunked).max() > 10
    bad_gap = (bad_chunked.double() - unchunked.double()).abs()  # bf16 statistics against the fp32-statistics path
    assert bool((bad_gap > 2 * U * m + tol_chunked + tol_unchunked).any())


def test_unchunked_logps_under_autocast_keep_fp32_statistics():
    """fp32 hidden states and weights under bf16 autocast (what `precision: bf16` runs): the unchunked path's
    logits come out of a bf16 matmul, its statistics stay fp32 (within the fp32 bound of its own logits' exact
    log-softmax), and the chunked path agrees with it within the lean/naive bound tau = 2U (2 S + M) per token
    (bf16 rounding of h, W and z against an fp32 projection; see test_lean_matches_naive_in_bf16)."""
    hidden, weight, targets = _projection_problem(torch.float32)
    with _autocast():
        logits = hidden @ weight.T
        unchunked = logps.token_logps(hidden, weight, targets)
        chunked = logps.token_logps(hidden, weight, targets, chunk_size=CHUNK)
    assert logits.dtype == BF16 and unchunked.dtype == torch.float32  # autocast did run the matmul in bf16
    tol = _fp32_tolerance(hidden, weight, 1)
    assert bool(((unchunked.double() - _exact(logits, targets)).abs() <= tol).all())
    h, w = hidden.double(), weight.double()
    tau = 2 * U * (2 * (h.abs() @ w.abs().T).max(-1).values + (h @ w.T).abs().max(-1).values)
    assert bool(((chunked.double() - unchunked.double()).abs() <= tau + 2 * tol).all())


def test_chunked_logps_ignore_autocast():
    """The chunked path promises fp32 logits and statistics whatever the inputs; under bf16 autocast (fp32 inputs)
    its values and its gradient must be those it computes without autocast, to fp32 accuracy: values within
    `_fp32_tolerance`; gradients d/dh = sum_j (1[j=t] - p_j) W_j within 2 delta max_j |W_ji|, where delta (the
    largest value bound) bounds the relative error of each softmax weight p_j.

    Without the autocast guard in `_ChunkedTokenLogProb` it misses by bf16 amounts: each chunk's logits are rounded
    to bf16 and so is its log-sum-exp (~5-6 here: up to half an ulp, 2^-6 ~ 0.016); seen 0.010, ~40x the fp32
    bound (~2.7e-4).
    """
    hidden, weight, targets = _projection_problem(torch.float32)

    def run(autocast: bool):
        h = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            values = logps.token_logps(h, weight, targets, chunk_size=CHUNK)
        (grad,) = torch.autograd.grad(values.sum(), h)  # backward outside autocast, as the Trainer runs it
        return values.detach().double(), grad.double()

    plain, plain_grad = run(False)
    mixed, mixed_grad = run(True)
    tol = _fp32_tolerance(hidden, weight, math.ceil(VOCAB / CHUNK))
    assert bool(((mixed - plain).abs() <= tol).all()), ((mixed - plain).abs() / tol).max().item()
    grad_tol = 2 * tol.max() * weight.double().abs().max(0).values
    assert bool(((mixed_grad - plain_grad).abs() <= grad_tol).all())
