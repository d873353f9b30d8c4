"""Training data: the kept pairs of a pairs table, encoded over their stored frames, and collated into pair batches.

`PairsDataset` reads the pairs table and the frames the sampling stage stored (never re-sampled); `PairCollator`
batches pairs as two rows each (B chosen, then B rejected) or, with prefix sharing (the trainer's default), as one
`[prompt | chosen | rejected]` row each (leanpo_core/prefix.py). The trainer (leanpo_core/train.py) and the benchmarks
use them.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
import torch

from leanpo_core import features, io, models, prefix, prompts, schemas
from leanpo_core import frames as frames_mod

# Columns of a pair batch that are not model inputs: each side's displacement baseline (B,).
SIDE_INFO = ("chosen_baseline", "rejected_baseline")


def displacement_baseline(row: dict, side: str) -> float:
    """rbar of a response before training, under the TRAINING input (plain question, clean frames).

    The reflect stage's SFT log-prob (`<side>_sft_logp`) is measured under exactly that input; the generation-time
    log-prob is not (chosen: the hint/reflection prompt; rejected: the 2-frame lean view), so it is only the
    fallback when no SFT score was stored. NaN when neither is known.
    """
    sft = row.get(f"{side}_sft_logp")
    if sft is not None and math.isfinite(sft):
        return float(sft)
    gen = row.get(f"{side}_gen_logp")
    return float(gen) if gen is not None else float("nan")


class PairsDataset(torch.utils.data.Dataset):
    """Kept pairs, each encoded as (chosen, rejected) model inputs over the same stored frames.

    Frames come from the frames table through `FrameStore`, a whole shard per lookup, the last `cache_shards`
    shards kept decoded. The prompt is the plain question in the model's chat template (as the reflect stage scores
    and evaluation asks); each response is tokenised apart from the prompt and closed with the end-of-reply token
    unless it was cut at max_tokens (`models.ended_by_itself`: the rule the reflect stage scored it by, so a pair's
    stored SFT log-probs are what this encoding gives under the SFT model and displacement starts at zero).
    """

    def __init__(self, pairs_uri: str, frames_uri: str, processor, adapter: models.FamilyAdapter, max_length: int,
                 options: io.StorageOptions | None = None, cache_shards: int = 4):
        table = io.read_table(pairs_uri, schemas.PAIRS, options)
        self.rows = [r for r in table.to_pylist() if r["kept"]]
        if not self.rows:
            raise ValueError(f"no kept pairs in {pairs_uri}")
        self.store = frames_mod.FrameStore(frames_uri, options)
        for row in self.rows:
            if row["video_key"] not in self.store.rows:
                raise ValueError(f"pair {row['pair_id']}: video_key {row['video_key']!r} not in {frames_uri}")
            if list(row["chosen_frame_indices"]) != list(row["rejected_frame_indices"]):
                raise ValueError(f"pair {row['pair_id']}: chosen and rejected are scored on different frames; "
                                 "the trainer encodes one video per pair")
        self.processor, self.adapter, self.max_length = processor, adapter, max_length
        self.cache_shards = cache_shards
        self._shards: collections.OrderedDict[str, dict] = collections.OrderedDict()
        tokenizer = getattr(processor, "tokenizer", processor)
        # Text tokens only: under one frames config every pair's video adds the same number of tokens.
        self.lengths = [len(tokenizer(r["prompt"] + r["chosen"] + r["rejected"])["input_ids"]) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def _frames(self, key: str) -> tuple[np.ndarray, dict]:
        shard = self.store.rows[key]["shard_uri"]
        if shard not in self._shards:
            keys = [k for k, r in self.store.rows.items() if r["shard_uri"] == shard]
            self._shards[shard] = self.store.load(keys)
            while len(self._shards) > self.cache_shards:
                self._shards.popitem(last=False)
        self._shards.move_to_end(shard)
        return self._shards[shard][key]

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        pixels, frame_row = self._frames(row["video_key"])
        stored = list(frame_row["frame_indices"])
        wanted = list(row["chosen_frame_indices"])
        positions = [stored.index(i) for i in wanted]
        clip = pixels if positions == list(range(len(stored))) else pixels[positions]
        meta = frames_mod.frames_metadata(frame_row, clip, wanted)
        prompt = self.adapter.build_prompt(self.processor, prompts.plain_prompt(row["prompt"]))
        once = models.ProcessOnce(self.processor)  # both sides share prompt and video: pixels prepared once per pair
        chosen, rejected = (self.adapter.encode(once, clip, prompt, row[side], meta=meta,
                                                add_end=models.ended_by_itself(row.get(f"{side}_finish_reason")))
                            for side in ("chosen", "rejected"))
        return {"chosen": self._truncate(chosen, row), "rejected": self._truncate(rejected, row),
                "chosen_baseline": displacement_baseline(row, "chosen"),
                "rejected_baseline": displacement_baseline(row, "rejected"),
                features.VIDEO_IDS: f"{row['video_key']}@{','.join(map(str, wanted))}"}

    def _truncate(self, inputs: dict, row: dict) -> dict:
        """Cut the response tail past max_length; the prompt (with its video tokens) must fit whole."""
        length = inputs["input_ids"].shape[1]
        if length <= self.max_length:
            return inputs
        prompt_len = int((inputs["labels"][0] == models.IGNORE_INDEX).sum())
        if prompt_len >= self.max_length:
            raise ValueError(f"pair {row['pair_id']}: the prompt alone has {prompt_len} tokens, max_length is "
                             f"{self.max_length}")
        return {k: v[:, :self.max_length] if models.is_per_token(k) else v for k, v in inputs.items()}


@dataclasses.dataclass
class PairCollator:
    """A batch of B pairs, right-padded to one length: per-token tensors of 2B rows (B chosen, then B rejected),
    or with `prefix_sharing` B joined rows `[prompt | chosen | rejected]` and their `pair_lengths` (B, 3)
    (`prefix.join_pair`); the vision inputs of the B videos once; the displacement baselines (B,) of each side.
    `chosen_only` leaves the rejected responses out of the joined rows: their log-prob sums and counts are 0."""

    pad_id: int
    prefix_sharing: bool = False
    chosen_only: bool = False  # joined rows without the rejected response (objective sft; needs prefix_sharing)

    def __call__(self, items: list[dict]) -> dict:
        if self.prefix_sharing:
            rows = [prefix.join_pair(it["chosen"], None if self.chosen_only else it["rejected"]) for it in items]
        else:
            rows = [it["chosen"] for it in items] + [it["rejected"] for it in items]
        batch = prefix.collate_rows(rows, self.pad_id, videos=rows[:len(items)])  # row b shows pair b's video
        for side in SIDE_INFO:
            batch[side] = torch.tensor([it[side] for it in items], dtype=torch.float64)
        if all(features.VIDEO_IDS in it for it in items):
            batch[features.VIDEO_IDS] = [it[features.VIDEO_IDS] for it in items]
        return batch
