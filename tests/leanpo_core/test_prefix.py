"""Prefix sharing: one `[prompt | chosen | rejected]` row per pair gives the two-sequence path's log-probs, losses
and gradients (fp32, 1e-5) on all four families, with gradient checkpointing and LoRA, and reads the prompt once."""

from __future__ import annotations

import math

import pytest
import torch

from leanpo_core import logps, models, pairdata, prefix, train
from leanpo_core.config import TrainConfig

from .conftest import FAMILIES
from .test_train import _config, _count_videos, _pair_items, pair_data  # noqa: F401 (fixture)

TEXTS = [("What moves?", " a red square moves left", " a blue circle"),
         ("What colour is the square in the video?", " red", " it is green and large and slow")]


def _items(processor, adapter, video, texts=TEXTS):
    return _pair_items(processor, adapter, video, texts)


def _batches(processor, items):
    pad = getattr(processor, "tokenizer", processor).pad_token_id or 0
    return pairdata.PairCollator(pad)(items), pairdata.PairCollator(pad, prefix_sharing=True)(items)


def test_mask_positions_and_score_index_by_hand():
    """Row 0: P=3, C=2, R=2 (L=7); row 1: P=2, C=1, R=1 plus 3 padding positions."""
    lengths = torch.tensor([[3, 2, 2], [2, 1, 1]])
    mask = prefix.attention_mask(lengths, 7, "sdpa")[:, 0].int()
    assert mask[0].tolist() == [[1, 0, 0, 0, 0, 0, 0],
                                [1, 1, 0, 0, 0, 0, 0],
                                [1, 1, 1, 0, 0, 0, 0],
                                [1, 1, 1, 1, 0, 0, 0],  # chosen
                                [1, 1, 1, 1, 1, 0, 0],
                                [1, 1, 1, 0, 0, 1, 0],  # rejected: prompt and itself, not the chosen tokens
                                [1, 1, 1, 0, 0, 1, 1]]
    assert mask[1].tolist() == [[1, 0, 0, 0, 0, 0, 0],
                                [1, 1, 0, 0, 0, 0, 0],
                                [1, 1, 1, 0, 0, 0, 0],
                                [1, 1, 0, 1, 0, 0, 0],
                                [1, 1, 0, 1, 0, 0, 0],  # padding queries see real prompt/rejected keys: no empty row
                                [1, 1, 0, 1, 0, 0, 0],
                                [1, 1, 0, 1, 0, 0, 0]]
    eager = prefix.attention_mask(lengths, 7, "eager")
    assert eager.dtype == torch.float32 and torch.equal(eager == 0, mask[:, None].bool())
    labels = torch.full((2, 7), -100)
    labels[0, 3:7] = torch.tensor([10, 11, 20, 21])
    labels[1, 2:4] = torch.tensor([30, 40])
    rows, hidden_pos, targets, sequences = prefix.score_index(labels, lengths)
    assert list(zip(rows.tolist(), hidden_pos.tolist(), targets.tolist(), sequences.tolist())) == [
        (0, 2, 10, 0), (0, 3, 11, 0),  # chosen: predicted by the token before
        (0, 2, 20, 2), (0, 5, 21, 2),  # rejected: its first token from the prompt's last position
        (1, 1, 30, 1), (1, 1, 40, 3)]


def test_split_attention_is_the_masked_attention():
    """`split_attention` on joined rows (2 and 3 responses, padding, grouped key/value heads) equals SDPA under the
    rows' 4-D mask at every real position (fp64), and its gradients too; without lengths it is SDPA itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Attention(torch.nn.Module):
        num_key_value_groups, is_causal = 2, True

    lengths = torch.tensor([[5, 3, 4, 2], [4, 2, 3, 0]])  # row 1: a pair with a shorter prompt, 5 padding positions
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 14, 8, dtype=torch.float64, generator=generator, requires_grad=True)
               for heads in (4, 2, 2))
    module = Attention()
    masked = sdpa_attention_forward(module, q, k, v, prefix.attention_mask(lengths, 14, "sdpa"))[0]
    split = prefix.split_attention(module, q, k, v, None, joined_lengths=tuple(map(tuple, lengths.tolist())))[0]
    real = (torch.arange(14)[None, :] < lengths.sum(1)[:, None])[..., None, None]
    torch.testing.assert_close(split * real, masked * real, atol=1e-12, rtol=0)
    weights = torch.randn(masked.shape, dtype=torch.float64, generator=generator) * real
    grads = [torch.autograd.grad((out * weights).sum(), (q, k, v)) for out in (masked, split)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    plain = prefix.split_attention(module, q, k, v, None)[0]
    torch.testing.assert_close(plain, sdpa_attention_forward(module, q, k, v, None)[0], atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_joined_rows_attend_in_parts(family, loaded, video, monkeypatch):
    """On SDPA the language model attends joined rows of `SPLIT_MIN_LENGTH` positions or more in parts
    (`split_attention`), each part one call for the whole batch, never over the whole row under its 4-D mask, and
    gives the log-probs of the masked call (1e-5); shorter rows take the masked call."""
    from transformers.integrations import sdpa_attention

    model, processor, adapter = loaded(family)
    _, joined = _batches(processor, _items(processor, adapter, video))
    calls, original = [], sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                        lambda module, q, k, v, mask, **kw: calls.append((q.shape[2], mask is None))
                        or original(module, q, k, v, mask, **kw))
    width = joined["input_ids"].shape[1]
    assert width < prefix.SPLIT_MIN_LENGTH  # the toys' rows are short: one masked call
    with torch.no_grad():
        masked = train.pair_logps(model, adapter, joined)
        assert calls == []
        monkeypatch.setattr(prefix, "SPLIT_MIN_LENGTH", width)
        split = train.pair_logps(model, adapter, joined)
    assert torch.equal(split[1], masked[1])
    torch.testing.assert_close(split[0], masked[0], atol=1e-5, rtol=0)
    assert prefix.attention_implementation(model) == "sdpa"
    assert models.unwrap(model).get_decoder().config._attn_implementation == prefix.SPLIT_ATTENTION
    layers = models.unwrap(model).get_decoder().config.num_hidden_layers
    assert len(calls) == 2 * layers  # per layer, for both rows at once: prompt + chosen causal, rejected over the
    assert all(length < width for length, _ in calls) and sum(causal for _, causal in calls) == layers  # prompt


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_rows_in_parts_give_the_masked_gradients(family, toy_dirs, video, monkeypatch):
    """Gradient checkpointing and LoRA on: the LeanPO loss and every trainable gradient of rows attended in parts
    equal those of the one masked call (1e-5), so a recomputation attends as the forward did."""
    model, processor, adapter = _fresh(toy_dirs, family, lora=True, checkpointing=True)
    _, joined = _batches(processor, _items(processor, adapter, video))
    config = TrainConfig(model="x", smoothing_threshold=math.inf)
    runs = {}
    for threshold in (prefix.SPLIT_MIN_LENGTH, joined["input_ids"].shape[1]):  # masked (short rows), then in parts
        monkeypatch.setattr(prefix, "SPLIT_MIN_LENGTH", threshold)
        out = train.objective_loss(config, *train.pair_logps(model, adapter, joined), joined)
        runs[threshold] = (out.loss.item(), _trainable_grads(model, out.loss))
    assert models.unwrap(model).get_decoder().config._attn_implementation == prefix.SPLIT_ATTENTION
    (masked_loss, masked), (split_loss, split) = runs.values()
    assert abs(masked_loss - split_loss) < 1e-5 and masked and masked.keys() == split.keys()
    for name in masked:
        torch.testing.assert_close(split[name], masked[name], atol=1e-5, rtol=0, msg=name)


class _QwenLike:
    def __init__(self):
        self.mrope = True

    def text_positions(self, model, inputs):
        return torch.arange(7).expand(3, 1, 7) + 10


def test_rejected_positions_continue_the_prompt():
    """1-D and M-RoPE: the rejected run is numbered as if it followed the prompt directly."""
    lengths = torch.tensor([[3, 2, 2]])
    inputs = {"attention_mask": torch.ones(1, 7, dtype=torch.long)}
    flat = prefix.positions(None, models.LLAVA_NEXT_VIDEO, inputs, lengths)
    assert flat.tolist() == [[0, 1, 2, 3, 4, 3, 4]]
    assert prefix.positions(None, _QwenLike(), inputs, lengths)[:, 0].tolist() == [[10, 11, 12, 13, 14, 13, 14]] * 3


def _fresh(toy_dirs, family, lora: bool, checkpointing: bool):
    model, processor, adapter = models.load_model(toy_dirs[family], dtype=torch.float32)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # checkpointing is active in training mode only (the toys have no dropout)
    else:
        model.eval()
    if lora:
        model = train._add_lora(model, rank=4)
        for name, p in model.named_parameters():  # non-zero B so the adapters change the forward
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    return model, processor, adapter


def _trainable_grads(model, value):
    model.zero_grad()
    value.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["plain", "checkpointing", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_shared_equals_vision_once(family, variant, toy_dirs, video, monkeypatch):
    """Sums, counts, every objective's loss (dpo with its reference pass) and gradients: 1e-5 in fp32."""
    model, processor, adapter = _fresh(toy_dirs, family, lora=variant == "lora",
                                       checkpointing=variant == "checkpointing")
    two_rows, joined = _batches(processor, _items(processor, adapter, video))
    assert joined["input_ids"].shape[0] == 2 and two_rows["input_ids"].shape[0] == 4
    seen = _count_videos(models.unwrap(model), monkeypatch)
    shared = train.pair_logps(model, adapter, joined, chunk_size=7)
    once = train.pair_logps(model, adapter, two_rows, chunk_size=7)
    assert len(seen) == 2 and seen[0] == seen[1]  # one video per pair on both paths
    assert torch.equal(shared[1], once[1])
    torch.testing.assert_close(shared[0], once[0], atol=1e-5, rtol=0)
    with torch.no_grad():
        ref = train.pair_logps(model, adapter, joined)[0] - 0.25  # a reference pass on joined rows, shifted
    for objective in ("leanpo", "simpo", "dpo", "sft"):
        config = TrainConfig(model="x", objective=objective, smoothing_threshold=math.inf)
        shared_loss = train.objective_loss(config, *shared, joined, ref).loss
        once_loss = train.objective_loss(config, *once, two_rows, ref).loss
        assert abs(shared_loss.item() - once_loss.item()) < 1e-5, objective
    config = TrainConfig(model="x", smoothing_threshold=math.inf)
    grads_shared = _trainable_grads(model, train.objective_loss(config, *shared, joined).loss)
    grads_once = _trainable_grads(model, train.objective_loss(config, *once, two_rows).loss)
    assert grads_shared and grads_shared.keys() == grads_once.keys()
    if variant == "lora":
        assert all("lora" in n for n in grads_shared)
    for name in grads_shared:
        torch.testing.assert_close(grads_shared[name], grads_once[name], atol=1e-5, rtol=0, msg=name)


def test_prompt_is_read_once(loaded, video):
    """The language model sees B rows of P + C + R tokens, not 2B rows of P + max(C, R)."""
    model, processor, adapter = loaded("qwen2_vl")
    items = _items(processor, adapter, video)
    _, joined = _batches(processor, items)
    shapes = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    try:
        with torch.no_grad():
            train.pair_logps(model, adapter, joined)
    finally:
        hook.remove()
    longest = max(prefix.prompt_length(it["chosen"]) + sum(it[s]["input_ids"].shape[1] - prefix.prompt_length(it[s])
                                                             for s in ("chosen", "rejected")) for it in items)
    assert shapes == [(2, longest)]


def test_unsupported_attention_is_named(loaded):
    model, _, _ = loaded("llava_onevision")
    assert prefix.unsupported_reason(model) is None
    original = model.config._attn_implementation
    try:
        model.config._attn_implementation = "flash_attention_2"
        assert "flash_attention_2" in prefix.unsupported_reason(model)
    finally:
        model.config._attn_implementation = original


def test_pairs_with_different_prompts_are_refused(loaded, video):
    model, processor, adapter = loaded("qwen2_vl")
    a, b = _items(processor, adapter, video)
    with pytest.raises(ValueError, match="same prompt"):
        prefix.join_pair(a["chosen"], b["rejected"])


def test_training_with_and_without_prefix_sharing_agree(pair_data, toy_dirs, tmp_path, monkeypatch):
    """`train.train` (3 steps of 2 pairs, LeanPO): the same losses and exported weights with prefix sharing, without
    it, and with the step's two pairs packed into one row.

    Step 1 starts from the same weights, so its loss agrees to 1e-5; later steps follow weights moved by Adam, which
    normalises per-parameter noise of ~1e-7 in near-zero gradients to ~lr, hence 1e-4 (as between ZeRO stages).
    """
    from leanpo_core import io, schemas

    runs, calls, original = {}, [], prefix.pair_logps
    monkeypatch.setattr(prefix, "pair_logps", lambda *a, **k: calls.append(k.get("pack_tokens")) or original(*a, **k))
    for sharing, pack in ((True, 0), (False, 0), (True, 4096)):  # 4096: both pairs of a step in one packed row
        config = _config(toy_dirs["llava_onevision"], prefix_sharing=sharing, pack_tokens=pack)
        calls.clear()
        result = train.train(config, *pair_data, str(tmp_path / f"{sharing}-{pack}"))
        assert calls == ([pack] * 3 if sharing else [])  # one joined forward per step, only when on
        table = io.read_table(result.metrics_uri, schemas.TRAIN_METRICS)
        runs[sharing, pack] = (table.column("loss").to_pylist(), models.load_model(result.model_dir)[0].state_dict())
    (shared_losses, shared), (plain_losses, plain) = runs[True, 0], runs[False, 0]
    assert TrainConfig(model="x").prefix_sharing and not TrainConfig(model="x").pack_tokens  # the defaults
    assert len(shared_losses) == 3 and abs(shared_losses[0] - plain_losses[0]) < 1e-5
    assert shared_losses == pytest.approx(plain_losses, rel=1e-4)
    for key in plain:
        torch.testing.assert_close(shared[key], plain[key], atol=1e-4, rtol=0, msg=key)
    packed_losses, packed = runs[True, 4096]
    assert abs(packed_losses[0] - shared_losses[0]) < 1e-5 and packed_losses == pytest.approx(shared_losses, rel=1e-4)
    for key in shared:
        torch.testing.assert_close(packed[key], shared[key], atol=1e-4, rtol=0, msg=key)


def test_sft_runs_the_chosen_side_only(loaded, video):
    """Objective sft with prefix sharing: rows [P | C] (no rejected tokens run), the same SFT loss as the full pair
    batch, the rejected side's counts 0 and no rejected metrics reported."""
    model, processor, adapter = loaded("qwen2_5_vl")
    items = _items(processor, adapter, video)
    pad = processor.tokenizer.pad_token_id or 0
    chosen_only = pairdata.PairCollator(pad, prefix_sharing=True, chosen_only=True)(items)
    _, joined = _batches(processor, items)
    assert chosen_only[prefix.LENGTHS][:, 2].tolist() == [0, 0]
    assert chosen_only["input_ids"].shape[1] == max(it["chosen"]["input_ids"].shape[1] for it in items)
    config = TrainConfig(model="x", objective="sft")
    with torch.no_grad():
        sums, counts = train.pair_logps(model, adapter, chosen_only)
        full = train.pair_logps(model, adapter, joined)
    assert counts[2:].tolist() == [0, 0] and torch.equal(counts[:2], full[1][:2])
    out = train.objective_loss(config, sums, counts, chosen_only)
    assert abs(out.loss.item() - train.objective_loss(config, *full, joined).loss.item()) < 1e-5
    assert "logps/rejected" not in out.metrics and "displacement/rejected" not in out.metrics
    assert "displacement/chosen" in out.metrics


def test_text_only_pairs_of_a_causal_lm(tmp_path):
    """adapter None: a text causal LM's joined rows give the two-row response log-probs (1e-5) and gradients."""
    import transformers

    from leanpo_core import toy

    tok = toy.build_tokenizer("qwen")
    config = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

    def encode(prompt, response):
        p, r = tok(prompt)["input_ids"], tok(response)["input_ids"] + [tok.eos_token_id or 0]
        ids = torch.tensor([p + r])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([[-100] * len(p) + r])}

    items = [{"chosen": encode(q, c), "rejected": encode(q, r), "chosen_baseline": 0.0, "rejected_baseline": 0.0}
             for q, c, r in TEXTS]
    two_rows, joined = _batches(tok, items)
    shared = prefix.pair_logps(model, None, joined)
    once = logps.model_response_logps(model, two_rows)
    assert torch.equal(shared[1], once[1])
    torch.testing.assert_close(shared[0], once[0], atol=1e-5, rtol=0)
    grads = [_trainable_grads(model, out[0].sum()) for out in (shared, once)]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=0, msg=name)


def test_packing_plan_and_layout_by_hand():
    """Pairs of 5, 3, 4 and 9 tokens into rows of up to 8: [5, 3], [4], [9] (a longer pair gets a row alone)."""
    packing = prefix.Packing.plan([5, 3, 4, 9], max_tokens=8)
    assert (packing.rows, packing.offsets, packing.length, packing.num_rows) == ([0, 0, 1, 2], [0, 5, 0, 0], 9, 3)
    assert packing.padding_share() == pytest.approx(1 - 21 / 27)
    assert prefix.padding_share(torch.tensor([[3, 1, 1], [1, 1, 1], [2, 1, 1], [7, 1, 1]]), 9) == pytest.approx(
        1 - 21 / 36)
    lengths = torch.tensor([[1, 1, 1], [1, 1, 0]])  # 3 and 2 tokens, padded to 3
    values = torch.tensor([[1, 2, 3], [4, 5, 0]])
    two = prefix.Packing.plan([3, 2], max_tokens=8)
    assert two.tokens(values, -1).tolist() == [[1, 2, 3, 4, 5]]
    assert two.tokens(values[None].expand(3, 2, 3), 0).shape == (3, 1, 5)  # M-RoPE positions keep their axis
    mask = two.mask(prefix.allowed_keys(lengths, 3))[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [1, 0, 1, 0, 0],  # pair 0's rejected token: prompt and itself
                    [0, 0, 0, 1, 0],  # pair 1 sees nothing of pair 0
                    [0, 0, 0, 1, 1]]
    rows, pos = two.index(torch.tensor([0, 1]), torch.tensor([1, 0]))
    assert (rows.tolist(), pos.tolist()) == ([0, 0], [1, 3])


def _two_clip_items(processor, adapter, video):
    """Three pairs of different lengths over two different clips (so a mix-up of videos in a packed row shows)."""
    frames, meta = video
    items = []
    for start, (question, chosen, rejected) in zip((0, 4, 0), [*TEXTS, ("Is it?", " yes", " no it is not")]):
        clip = frames[start:start + 4]
        clip_meta = models.video_metadata(clip, fps=meta["fps"], frames_indices=meta["frames_indices"][start:start + 4],
                                          total_num_frames=meta["total_num_frames"])
        prompt = adapter.build_prompt(processor, question)
        items.append({side: adapter.encode(processor, clip, prompt, text, meta=clip_meta)
                      for side, text in (("chosen", chosen), ("rejected", rejected))}
                     | {"chosen_baseline": -2.0, "rejected_baseline": -3.0})
    return items


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_pairs_equal_one_row_per_pair(family, toy_dirs, video):
    """Three pairs packed into two rows (two pairs share one): the unpacked joined rows' sums, counts and gradients
    (1e-5, fp32)."""
    model, processor, adapter = _fresh(toy_dirs, family, lora=False, checkpointing=False)
    items = _two_clip_items(processor, adapter, video)
    _, joined = _batches(processor, items)
    sizes = joined[prefix.LENGTHS].sum(1).tolist()
    budget = sizes[0] + sizes[1]
    packing = prefix.Packing.plan(sizes, budget)
    assert packing.num_rows == 2 and packing.rows == [0, 0, 1]
    shapes = []
    hook = models.unwrap(model).model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    try:
        packed = train.pair_logps(model, adapter, joined, chunk_size=7, pack_tokens=budget)
        plain = train.pair_logps(model, adapter, joined, chunk_size=7)
    finally:
        hook.remove()
    assert shapes == [(2, packing.length), (3, joined["input_ids"].shape[1])]
    assert torch.equal(packed[1], plain[1])
    torch.testing.assert_close(packed[0], plain[0], atol=1e-5, rtol=0)
    config = TrainConfig(model="x", smoothing_threshold=math.inf)
    grads = [_trainable_grads(model, train.objective_loss(config, *out, joined).loss) for out in (
        train.pair_logps(model, adapter, joined, pack_tokens=budget), train.pair_logps(model, adapter, joined))]
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=0, msg=name)
