"""Prefix sharing: a preference pair as ONE sequence `[prompt | chosen | rejected]`, its prompt read once.

A pair's two sequences share the prompt, and with 16-64 frames the prompt (its video tokens) is most of each
sequence, so the vision-once path still runs the language model over it twice. Here the pair is one row: the chosen
tokens follow the prompt as usual; the rejected tokens attend to the prompt and to themselves, never to the chosen
tokens, and take the positions they would have right after the prompt alone. Every response token then sees the
same keys, values and positions as in its own `[prompt | response]` sequence, so log-probs, losses and gradients are
those of the two-sequence path up to float summation order (tests/leanpo_core/test_prefix.py checks 1e-5 in fp32).

Positions: a plain forward of the joined row numbers the rejected run on from the end of the chosen one; text
positions advance by one per token (on all three axes of Qwen's M-RoPE), so shifting the rejected run back by the
chosen length gives the positions after the prompt alone.

The attention mask is 4-D, handed to the model as-is (transformers uses a 4-D mask unchanged): boolean for SDPA, the
only form its kernels take besides the model dtype (on CUDA an explicit mask selects PyTorch's memory-efficient
kernel; the flash kernel takes none), additive for eager attention. Attention implementations that take no custom
mask (flash_attention_2/3, flex_attention without a block mask) are not supported: `unsupported_reason` says so and
the trainer falls back to the vision-once path.

The same holds for any number of responses to one prompt (`join_responses`: `[prompt | r1 | ... | rn]`, each
response seeing the prompt and itself): the reflect and evaluate stages score a question's candidates that way. And
several joined rows can share one row of the batch (`Packing`, `TrainConfig.pack_tokens`): a block-diagonal mask,
each block a row's own mask, each row's own positions.

    item = join_pair(adapter.encode(p, clip, prompt, chosen), adapter.encode(p, clip, prompt, rejected))
    sums, counts = pair_logps(model, adapter, collated_batch)   # (2B,): B chosen, then B rejected
"""

from __future__ import annotations

import dataclasses

import torch

from leanpo_core import logps, models

Tensor = torch.Tensor
# (B, 3) per joined row: prompt, chosen and rejected token counts.
LENGTHS = "pair_lengths"
SUPPORTED_ATTENTION = ("sdpa", "eager")
# The language model's attention while prefix sharing runs on SDPA (`split_attention`), registered with transformers.
SPLIT_ATTENTION = "leanpo_split_sdpa"
# Joined rows at least this long are attended in parts; shorter ones in one masked call. On PyTorch's CPU kernel a
# causal call over a 431-position row costs 0.89x the masked one, too little to pay for the extra operations: split
# is 1.15x the masked call there, 0.76x at 1200 positions, 0.56x at 2560 (forward + backward, one thread:
# bench/results/split_attention.md). A real video row (32 frames) is several thousand positions long.
SPLIT_MIN_LENGTH = 1024


def attention_implementation(model) -> str:
    """The attention implementation of `model`'s configuration ("sdpa" also when the language model runs
    `split_attention`, which is SDPA)."""
    implementation = getattr(models.unwrap(model).config, "_attn_implementation", None) or "eager"
    return "sdpa" if implementation == SPLIT_ATTENTION else implementation


def unsupported_reason(model) -> str | None:
    """Why prefix sharing cannot run on `model` (its attention implementation takes no 4-D mask), or None."""
    implementation = attention_implementation(model)
    if implementation in SUPPORTED_ATTENTION:
        return None
    return (f"attention implementation {implementation!r} takes no custom 4-D mask (prefix sharing needs one of "
            f"{', '.join(SUPPORTED_ATTENTION)})")


def prompt_length(inputs: dict) -> int:
    """Tokens before the response of a single-sequence `encode` output (its labels are IGNORE_INDEX there)."""
    return int((inputs["labels"][0] == models.IGNORE_INDEX).sum())


def join_pair(chosen: dict, rejected: dict | None) -> dict:
    """One row `[P | C | R]` from the encodings `[P | C]` and `[P | R]` of a pair (same prompt, same video).

    Per-token tensors (labels too) grow by the rejected response; the per-video inputs are the chosen side's;
    `pair_lengths` is (1, 3) = (P, C, R). Without a rejected encoding the row is `[P | C]` and R = 0 (its rejected
    sums and counts come out 0: the SFT objective reads the chosen side only).
    """
    joined = join_responses([chosen] if rejected is None else [chosen, rejected])
    if rejected is None:
        joined[LENGTHS] = torch.cat([joined[LENGTHS], torch.zeros(1, 1, dtype=torch.long)], dim=1)
    return joined


def join_responses(encodings: list[dict]) -> dict:
    """One row `[P | R1 | ... | Rn]` from the encodings `[P | Ri]` of n responses to the same prompt and video;
    `pair_lengths` (1, 1 + n) = (P, |R1|, ..., |Rn|). A pair is n = 2 (chosen, rejected)."""
    first = encodings[0]
    prompt = prompt_length(first)
    for other in encodings[1:]:
        if prompt_length(other) != prompt or not torch.equal(first["input_ids"][:, :prompt],
                                                             other["input_ids"][:, :prompt]):
            raise ValueError("responses joined into one row (a pair's chosen and rejected sequences) must start "
                             "with the same prompt")
    joined = {key: torch.cat([value, *(e[key][:, prompt:] for e in encodings[1:])], dim=1)
              if models.is_per_token(key) else value for key, value in first.items()}
    sizes = (prompt, *(e["input_ids"].shape[1] - prompt for e in encodings))
    joined[LENGTHS] = torch.tensor([sizes], dtype=torch.long)
    return joined


def collate_rows(rows: list[dict], pad_id: int, videos: list[dict] | None = None) -> dict:
    """Rows (single sequences or joined rows) as one batch: per-token tensors right-padded (`models.collate`),
    `pair_lengths` (B, S) completed with empty responses where rows join fewer, and the per-video inputs of `videos`
    (default: one per row) concatenated."""
    batch = models.collate([{k: v for k, v in row.items() if models.is_per_token(k)} for row in rows], pad_id)
    if LENGTHS in rows[0]:
        width = max(row[LENGTHS].shape[1] for row in rows)
        batch[LENGTHS] = torch.cat([torch.nn.functional.pad(row[LENGTHS], (0, width - row[LENGTHS].shape[1]))
                                    for row in rows])
    videos = rows if videos is None else videos
    for key in videos[0]:
        if key != LENGTHS and not models.is_per_token(key):
            batch[key] = torch.cat([video[key] for video in videos], dim=0)
    return batch


def _segments(lengths: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """For positions `index` (B, N) of joined rows: (segment: 0 the prompt, s the s-th response, padding counted
    in the last response; start of that segment), each (B, N)."""
    ends = lengths.cumsum(1)                                              # (B, S)
    segment = (index[..., None] >= ends[:, None, :]).sum(-1).clamp(max=lengths.shape[1] - 1)
    starts = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)
    return segment, starts.gather(1, segment)


def attention_mask(lengths: Tensor, length: int, implementation: str) -> Tensor:
    """(B, 1, L, L) mask of joined rows: causal, real keys only, rejected queries blind to the chosen keys.

    Boolean (True: attend) for SDPA, additive fp32 (0 or the fp32 minimum) for eager attention. Padding queries
    see the real keys (never an empty row, which would give NaN); their outputs are not read.
    """
    return for_implementation(allowed_keys(lengths, length), implementation)


def allowed_keys(lengths: Tensor, length: int) -> Tensor:
    """(B, 1, L, L) boolean `attention_mask` of joined rows (True: the query attends to the key): causal, real keys
    only, each response's queries see the prompt and their own response, no other (padding: the last one's)."""
    index = torch.arange(length, device=lengths.device)
    segment, _ = _segments(lengths, index.expand(lengths.shape[0], length))
    query, key = index[None, :, None], index[None, None, :]
    query_segment, key_segment = segment[:, :, None], segment[:, None, :]
    allowed = (key <= query) & (key < lengths.sum(1)[:, None, None])
    allowed &= (key_segment == 0) | (key_segment == query_segment)
    return allowed[:, None]


def for_implementation(allowed: Tensor, implementation: str) -> Tensor:
    """A boolean mask as the attention implementation takes it: as is (sdpa) or additive fp32 (eager)."""
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)


def split_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                    dropout: float = 0.0, scaling: float | None = None,
                    joined_lengths: tuple[tuple[int, ...], ...] | None = None, **kwargs) -> tuple[Tensor, None]:
    """SDPA over joined rows without computing the scores their 4-D mask throws away.

    With `joined_lengths` (per row its token counts (P, R1, ..., Rn), as `pair_logps` passes them) the batch is
    attended in parts, each part one kernel call for all rows: the prompts and first responses as plain causal
    attention without a mask (the kernel skips the upper triangle; on CUDA it is the flash kernel), then for each
    further response its queries, gathered from every row, over the prompt's keys and their own (a mask of
    R x (P + R)), written back in place. These are the keys `allowed_keys` allows, so the output is the masked
    attention's up to float summation order, for about (P + R1)^2 / 2 + R2 (P + R2) + ... scores instead of L^2:
    for a 2048-token prompt and two 256-token responses, 3.2 M instead of 6.6 M. Padding queries get values never
    read (no real query sees their keys). Without `joined_lengths` (every other forward) this is transformers' SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if joined_lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    sizes = torch.tensor(joined_lengths, device=query.device)                     # (B, S)
    length, prompts = query.shape[2], sizes[:, 0]
    width = int((sizes[:, 0] + sizes[:, 1]).max())
    out = sdpa_attention_forward(module, query[:, :, :width], key[:, :, :width], value[:, :, :width], None,
                                 dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]   # (B, W, H, D)
    if width < length:
        out = torch.cat([out, out.new_zeros(out.shape[0], length - width, *out.shape[2:])], dim=1)
    prompt_width = int(prompts.max())
    starts = sizes.cumsum(1)
    for s in range(2, sizes.shape[1]):
        count = int(sizes[:, s].max())
        if not count:
            continue
        step = torch.arange(count, device=query.device)
        valid = step[None, :] < sizes[:, s, None]                                 # (B, R)
        index = (starts[:, s - 1, None] + step[None, :]).clamp(max=length - 1)     # (B, R)

        def gather(x: Tensor) -> Tensor:
            return x.gather(2, index[:, None, :, None].expand(x.shape[0], x.shape[1], count, x.shape[3]))

        keys = torch.cat([key[:, :, :prompt_width], gather(key)], dim=2)
        values = torch.cat([value[:, :, :prompt_width], gather(value)], dim=2)
        own = (step[None, :] <= step[:, None])[None] & valid[:, None, :]          # (B, R, R)
        in_prompt = (torch.arange(prompt_width, device=query.device)[None, :] < prompts[:, None])[:, None, :]
        mask = torch.cat([in_prompt.expand(-1, count, -1), own], dim=2)[:, None]  # (B, 1, R, P + R)
        part = sdpa_attention_forward(module, gather(query), keys, values, mask, dropout=dropout, scaling=scaling,
                                      is_causal=False, **kwargs)[0]               # (B, R, H, D)
        placed = torch.zeros_like(out).scatter_add(
            1, index[:, :, None, None].expand_as(part), part * valid[:, :, None, None])
        mine = torch.zeros(out.shape[:2], dtype=torch.bool, device=out.device).scatter(1, index, valid)
        out = torch.where(mine[:, :, None, None], placed, out)
    return out, None


def use_split_attention(model) -> bool:
    """Let `model`'s language model attend joined rows with `split_attention` when it runs SDPA (any other forward
    of it stays SDPA). Returns whether it does. The choice is made on the model (not per call), so a recomputation
    under gradient checkpointing attends as the forward did."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = models.unwrap(model).get_decoder().config
    if config._attn_implementation == "sdpa":
        AttentionInterface.register(SPLIT_ATTENTION, split_attention)
        AttentionMaskInterface.register(SPLIT_ATTENTION, sdpa_mask)
        config._attn_implementation = SPLIT_ATTENTION
    return config._attn_implementation == SPLIT_ATTENTION


def positions(model, adapter: models.FamilyAdapter | None, inputs: dict, lengths: Tensor) -> Tensor:
    """Position ids of joined rows ((B, L), or (3, B, L) for M-RoPE; adapter None: a text-only model): each
    response's tokens numbered as if it followed the prompt directly."""
    plain = (adapter.text_positions(model, inputs) if adapter is not None
             else models.flat_positions(inputs["attention_mask"]))
    lengths = lengths.to(plain.device)
    index = torch.arange(plain.shape[-1], device=plain.device).expand(lengths.shape[0], plain.shape[-1])
    segment, start = _segments(lengths, index)
    shift = torch.where(segment > 0, start - lengths[:, :1], 0)  # the responses before this one
    return plain - shift.to(plain.dtype)


def score_index(labels: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For every scored token of B joined rows: (row, hidden position that predicts it, token, output sequence).

    Output sequences are the separate-sequence layout's: (s - 1) * B + b for the s-th response of row b (a pair:
    b for its chosen tokens, B + b for its rejected ones). A response's first token is predicted from the prompt's
    last position (not from the end of the response before it).
    """
    rows, hidden_pos, targets = logps.response_positions(labels)
    lengths = lengths.to(labels.device)
    segment, start = _segments(lengths[rows], (hidden_pos + 1)[:, None])
    segment, start = segment[:, 0], start[:, 0]
    hidden_pos = torch.where(hidden_pos + 1 == start, lengths[rows, 0] - 1, hidden_pos)
    return rows, hidden_pos, targets, rows + (segment - 1) * labels.shape[0]


@dataclasses.dataclass(frozen=True)
class Packing:
    """Where each joined row of a batch goes when several pairs share one row: pair b's P + C + R tokens start at
    `offsets[b]` of packed row `rows[b]`; rows are `length` long. Pairs keep the batch order, so a packed row meets
    its videos' placeholders in the order the vision inputs come in (no reordering of pixels or cached features)."""

    rows: list[int]
    offsets: list[int]
    sizes: list[int]
    length: int

    @classmethod
    def plan(cls, sizes: list[int], max_tokens: int) -> "Packing":
        """Next fit in batch order: a pair starts a new row when it would take the current one past `max_tokens`
        (a row holds at least one pair, so a pair longer than `max_tokens` gets a row of its own)."""
        rows, offsets, row, used = [], [], 0, 0
        for size in sizes:
            if used and used + size > max_tokens:
                row, used = row + 1, 0
            rows.append(row)
            offsets.append(used)
            used += size
        return cls(rows, offsets, list(sizes), max(o + n for o, n in zip(offsets, sizes)))

    @property
    def num_rows(self) -> int:
        return self.rows[-1] + 1

    def tokens(self, value: Tensor, fill: int | float) -> Tensor:
        """(..., B, L) per-token values of the joined rows -> (..., rows, length), `fill` in the padding."""
        out = value.new_full((*value.shape[:-2], self.num_rows, self.length), fill)
        for b, (row, start, size) in enumerate(zip(self.rows, self.offsets, self.sizes)):
            out[..., row, start:start + size] = value[..., b, :size]
        return out

    def mask(self, allowed: Tensor) -> Tensor:
        """(B, 1, L, L) boolean masks of the joined rows -> (rows, 1, length, length): each pair's block on the
        diagonal, nothing across pairs; a padding query attends to itself only (its output is not read)."""
        eye = torch.eye(self.length, dtype=torch.bool, device=allowed.device)
        out = eye.expand(self.num_rows, 1, self.length, self.length).clone()
        for b, (row, start, size) in enumerate(zip(self.rows, self.offsets, self.sizes)):
            end = start + size
            out[row, 0, start:end, start:end] = allowed[b, 0, :size, :size]
        return out

    def index(self, rows: Tensor, hidden_pos: Tensor) -> tuple[Tensor, Tensor]:
        """(row, position) of joined-row hidden positions in the packed rows."""
        packed_row = torch.tensor(self.rows, device=rows.device)[rows]
        return packed_row, torch.tensor(self.offsets, device=rows.device)[rows] + hidden_pos

    def padding_share(self) -> float:
        """Share of the packed rows' positions that hold no token."""
        return 1 - sum(self.sizes) / (self.num_rows * self.length)


def padding_share(lengths: Tensor, length: int) -> float:
    """Share of B joined rows' positions (right-padded to `length`) that hold no token."""
    return 1 - int(lengths.sum()) / (lengths.shape[0] * length)


def pair_logps(model, adapter: models.FamilyAdapter | None, batch: dict, chunk_size: int = 0,
               features=None, pack_tokens: int = 0) -> tuple[Tensor, Tensor]:
    """(sums, counts) of response log-probs, each (2B,), chosen rows first, from B joined rows: the vision tower
    once per pair (or never: `features`, its output when already computed), the prompt once per pair, logits only
    at response positions. adapter None: text-only pairs of a causal LM (`AutoModelForCausalLM`).

    `pack_tokens` > 0: the language model reads the pairs packed into rows of up to that many tokens
    (`Packing`, block-diagonal masks, each pair's positions as in its own row), so short pairs fill the padding of a
    batch instead of leaving it empty. The values are those of the unpacked rows up to float summation order.
    """
    lengths, ids = batch[LENGTHS], batch["input_ids"]
    implementation = attention_implementation(model)
    position_ids = positions(model, adapter, batch, lengths)
    rows, hidden_pos, targets, sequences = score_index(batch["labels"], lengths)
    split = (not pack_tokens and implementation == "sdpa" and ids.shape[1] >= SPLIT_MIN_LENGTH
             and use_split_attention(model))
    if split:  # no (L x L) mask at all: split_attention reads the rows' lengths
        inputs = {"attention_mask": None, "joined_lengths": tuple(tuple(row) for row in lengths.tolist())}
    else:
        allowed = allowed_keys(lengths.to(ids.device), ids.shape[1])
        if pack_tokens:
            packing = Packing.plan(lengths.sum(1).tolist(), pack_tokens)
            batch = {k: packing.tokens(v, models.padding_value(k)) if models.is_per_token(k) else v
                     for k, v in batch.items()}
            allowed, position_ids = packing.mask(allowed), packing.tokens(position_ids, 0)
            rows, hidden_pos = packing.index(rows, hidden_pos)
            ids = batch["input_ids"]
        inputs = {"attention_mask": for_implementation(allowed, implementation)}
    inputs["position_ids"] = position_ids
    if adapter is None:
        hidden = models.unwrap(model).model(input_ids=ids, **inputs).last_hidden_state
    else:
        hidden = adapter.shared_video_hidden_states(  # reads the model inputs of `batch`, nothing else
            model, batch, copies=1, features=features, **inputs)
    return logps.scored_logps(hidden, models.output_projection(model), rows, hidden_pos, targets, sequences,
                              (lengths.shape[1] - 1) * lengths.shape[0], chunk_size)
