"""Scoring precision (leanpo_core.scoring, `scoring_precision` of ReflectConfig / EvaluateConfig): the option is
validated, resolves to the right weight dtype, really loads bf16 weights, keeps the log-softmax and sums in fp32,
scores within a stated tolerance of fp32, and the reflect stage runs with it end to end.

Tolerance (bf16 unit roundoff U = 2^-8: round-to-nearest with an 8-bit significand moves x by at most U|x|). Per
response token, log p_t = z_t - logsumexp(z); a perturbation dz of the logits moves it by dz_t - sum_i p_i dz_i,
at most 2 max_i |dz_i| (the softmax weights p sum to 1). With bf16 weights the logits carry one rounding of the
weights, one of the residual stream per decoder layer and one of the output projection's result, each a relative
error of at most about U of the logit scale: max |dz| <~ (L + 2) U max|z| to first order, with L decoder layers and
max|z| the largest fp32 logit magnitude at the scored positions. rbar, a mean of per-token values, moves by at most
the largest of them, so |rbar_bf16 - rbar_fp32| <= TOL = 2 (L + 2) U max|z|. This is a first-order model, not a
rigorous bound (sub-layer errors could add up further); on the toy model (L = 2, max|z| ~ 0.7: TOL ~ 0.02) the
measured differences are ~1e-3, and the test also checks that TOL is smaller than the rbar difference between two
different replies, so a score of the wrong text could not pass it.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from leanpo_core import evaluate, io, logps, models, reflect, schemas, scoring
from leanpo_core.config import ConfigError, EvaluateConfig, ReflectConfig, load_config

from .test_reflect import run, write_run

U = 2.0 ** -8
BF16 = "bf16-weights-fp32-softmax"


def _items(video) -> list[dict]:
    frames, meta = video
    return [{"frames": frames, "meta": meta, "question": q, "response": r, "finish_reason": f}
            for q, r, f in [("What moves?", "A red square moves left across the video.", "stop"),
                            ("What colour?", "red", "stop"), ("What colour?", "blue", "stop"),
                            ("What moves?", "the square moves", "length")]]


def _tolerance(model, processor, adapter, items) -> float:
    """TOL = 2 (L + 2) U max|z| of the module docstring, from the fp32 model's logits at the scored positions."""
    head = models.output_projection(model).weight
    largest = 0.0
    with torch.no_grad():
        for _, batch in reflect.scoring_batches(processor, adapter, items, len(items), "cpu"):
            rows, positions, _ = logps.response_positions(batch["labels"])
            hidden = models.backbone_hidden_states(model, batch)[rows, positions]
            largest = max(largest, (hidden @ head.T).abs().max().item())
    layers = model.config.get_text_config().num_hidden_layers
    return 2 * (layers + 2) * U * largest


@pytest.mark.parametrize("cls", [ReflectConfig, EvaluateConfig])
def test_option_is_validated(cls, tmp_path):
    assert cls().scoring_precision == cls.model_fields["scoring_precision"].default
    assert set(scoring.PRECISIONS) == {"fp32", BF16, "auto"}
    for value in scoring.PRECISIONS:
        assert cls(scoring_precision=value).scoring_precision == value
    with pytest.raises(ValidationError, match="scoring_precision"):
        cls(scoring_precision="bf16")
    bad = tmp_path / "bad.yaml"
    bad.write_text("scoring_precision: fp16\n")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml.*scoring_precision.*'fp32'.*'auto'"):
        load_config(bad, cls)
    with pytest.raises(ValueError, match="scoring_precision must be one of"):
        scoring.weights_dtype("fp16", "cpu")


def test_precision_resolves_per_device(monkeypatch):
    """fp32 and bf16 are what they say anywhere; auto is fp32 on CPU and on a GPU without native bf16, bf16 on one
    with it; the reflect stage hash carries the resolved precision, so auto on CPU and on such a GPU differ."""
    assert scoring.weights_dtype("fp32", "cuda") == torch.float32
    assert scoring.weights_dtype(BF16, "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert scoring.resolve_device("auto") == "cpu"
    assert scoring.weights_dtype("auto", "auto") == scoring.weights_dtype("auto", "cpu") == torch.float32
    cpu_hash = reflect.stage_hash(ReflectConfig(scoring_precision="auto"), "m")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert scoring.resolve_device("auto") == "cuda"
    assert scoring.weights_dtype("auto", "auto") == torch.float32
    assert reflect.stage_hash(ReflectConfig(scoring_precision="auto"), "m") == cpu_hash
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert scoring.weights_dtype("auto", "auto") == torch.bfloat16
    assert scoring.weights_dtype("auto", "cpu") == torch.float32
    assert scoring.precision_label("auto", "cuda") == BF16
    assert reflect.stage_hash(ReflectConfig(scoring_precision="auto"), "m") != cpu_hash


def test_bf16_weights_load_as_bf16_and_score_within_tolerance(toy_dirs, video):
    items = _items(video)
    fp32 = scoring.load_scoring_model(toy_dirs["qwen2_vl"], "fp32", "cpu")
    bf16 = scoring.load_scoring_model(toy_dirs["qwen2_vl"], BF16, "cpu")
    assert {p.dtype for p in fp32[0].parameters()} == {torch.float32}
    assert {p.dtype for p in bf16[0].parameters()} == {torch.bfloat16}
    assert not bf16[0].training
    with torch.no_grad():  # the softmax statistics and the sums stay fp32 with bf16 weights
        _, batch = next(reflect.scoring_batches(bf16[1], bf16[2], items, len(items), "cpu"))
        hidden = models.backbone_hidden_states(bf16[0], batch)
        sums, _ = logps.model_response_logps(bf16[0], batch)
    assert hidden.dtype == torch.bfloat16 and sums.dtype == torch.float32
    want = reflect.sft_scores(*fp32, items, batch_size=2)
    got = reflect.sft_scores(*bf16, items, batch_size=2)
    tol = _tolerance(*fp32, items)
    assert 0 < tol < abs(want[1][0] - want[2][0])  # "red" vs "blue": the tolerance tells two replies apart
    for (mean, count), (want_mean, want_count) in zip(got, want):
        assert count == want_count
        assert mean != want_mean and mean == pytest.approx(want_mean, abs=tol)
    # evaluate scores through the same loader
    config = EvaluateConfig(scoring_precision=BF16, device="cpu", batch_size=2)
    assert evaluate.score(str(toy_dirs["qwen2_vl"]), items, config) == [mean for mean, _ in got]


def test_reflect_stage_with_bf16_weights(tmp_path, toy_dirs, video):
    """The stage with bf16 weights writes a valid scored table: every candidate, finite rbar within the tolerance
    of an fp32 run's, ranks 0..n-1 per side, scores by the formula, and its own stage hash."""
    model = toy_dirs["qwen2_vl"]
    configs = {p: ReflectConfig(judge=False, sft_logp_weight=0.5, batch_size=3, scoring_precision=p, device="cpu")
               for p in ("fp32", BF16)}
    tables = {}
    for precision, config in configs.items():
        layout = write_run(str(tmp_path / precision), video)
        assert [m.rows for m in run(layout, config, model)] == [4, 2]
        tables[precision] = io.read_dataset(layout.scored, schemas.SCORED).to_pylist()  # schema-checked read
    tol = _tolerance(*scoring.load_scoring_model(model, "fp32", "cpu"), _items(video))
    rows = tables[BF16]
    assert len(rows) == 6 and {r["config_hash"] for r in rows} == {reflect.stage_hash(configs[BF16], str(model))}
    assert reflect.stage_hash(configs[BF16], str(model)) != reflect.stage_hash(configs["fp32"], str(model))
    for row, ref in zip(rows, tables["fp32"]):
        assert (row["id"], row["side"], row["candidate"]) == (ref["id"], ref["side"], ref["candidate"])
        assert row["sft_num_tokens"] == ref["sft_num_tokens"] > 0
        assert row["sft_mean_logprob"] == pytest.approx(ref["sft_mean_logprob"], abs=tol)
        assert row["score"] == pytest.approx(row["prior_f1"] + 0.5 * row["sft_mean_logprob"])
    for key in {(r["id"], r["side"]) for r in rows}:
        group = [r for r in rows if (r["id"], r["side"]) == key]
        assert sorted(r["rank"] for r in group) == list(range(len(group)))
        assert [r["score"] for r in sorted(group, key=lambda r: r["rank"])] == sorted(
            (r["score"] for r in group), reverse=True)
