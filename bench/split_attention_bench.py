"""Attention over a joined pair row: one masked SDPA call vs `prefix.split_attention`, by row length (CPU, fp32).

    .venv/bin/python bench/split_attention_bench.py [--shapes 303:64:64 1000:100:100 2048:256:256] [--repeats 5]

A joined row `[prompt | chosen | rejected]` (P:C:R tokens) through one attention layer's kernel, forward and backward,
three ways, taking turns within every repeat:

  masked        transformers' SDPA with the row's 4-D boolean mask (`prefix.attention_mask`): every one of the L^2
                scores computed, the masked ones thrown away
  split         `prefix.split_attention`: prompt + chosen as one causal call, the rejected queries over the prompt's
                keys and their own (what prefix sharing runs for rows of `prefix.SPLIT_MIN_LENGTH` positions or more)
  causal        one causal call over the whole row, no mask: the floor (it computes no rejected-to-prompt-only
                attention, so it is not a correct pair forward; it shows what the kernel's causal skipping saves)

Random q, k, v of --heads heads of 64, one torch thread; CPU time per call (forward + backward) is the median over
--repeats of the mean over --calls calls. Writes bench/results/split_attention.md and .json (per shape: ms per
call of each way, split / masked, causal / masked). `prefix.SPLIT_MIN_LENGTH` is chosen from these ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

WAYS = ("masked", "split", "causal")


def measure(prompt: int, chosen: int, rejected: int, heads: int, calls: int, repeats: int) -> dict[str, float]:
    """Median CPU ms per forward + backward call of each way."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from leanpo_core import prefix

    class Layer(torch.nn.Module):
        num_key_value_groups, is_causal = 1, True

    layer, length = Layer(), prompt + chosen + rejected
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, 64, generator=generator, requires_grad=True) for _ in range(3))
    mask = prefix.attention_mask(torch.tensor([[prompt, chosen, rejected]]), length, "sdpa")
    forward = {"masked": lambda: sdpa_attention_forward(layer, q, k, v, mask)[0],
               "split": lambda: prefix.split_attention(layer, q, k, v, None,
                                                       joined_lengths=((prompt, chosen, rejected),))[0],
               "causal": lambda: sdpa_attention_forward(layer, q, k, v, None, is_causal=True)[0]}
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for round_ in range(repeats + 1):
        for way in WAYS:
            start = time.process_time()
            for _ in range(calls):
                forward[way]().sum().backward()
            if round_:  # the first round warms up
                times[way].append(1000 * (time.process_time() - start) / calls)
    return {way: common.median(t) for way, t in times.items()}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["303:64:64", "1000:100:100", "2048:256:256"],
                        help="PROMPT:CHOSEN:REJECTED token counts (303:64:64 is the video step's row at 32 frames)")
    parser.add_argument("--heads", type=int, default=2, help="attention heads (head_dim 64)")
    parser.add_argument("--calls", type=int, default=20, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings per way, after one warm-up round")
    args = parser.parse_args(argv)

    import torch

    from leanpo_core import prefix

    torch.set_num_threads(1)
    summary, rows = {}, []
    for spec in args.shapes:
        prompt, chosen, rejected = (int(x) for x in spec.split(":"))
        ms = measure(prompt, chosen, rejected, args.heads, args.calls, args.repeats)
        length = prompt + chosen + rejected
        entry = {**{f"{way}_ms": round(ms[way], 3) for way in WAYS}, "length": length,
                 "split_over_masked": round(ms["split"] / ms["masked"], 3),
                 "causal_over_masked": round(ms["causal"] / ms["masked"], 3),
                 "split_used": length >= prefix.SPLIT_MIN_LENGTH}
        summary[spec] = entry
        rows.append([spec, str(length), *(f"{ms[way]:.2f}" for way in WAYS), f"{entry['split_over_masked']:.2f}",
                     f"{entry['causal_over_masked']:.2f}", "split" if entry["split_used"] else "masked"])
        print(spec, entry, flush=True)
    body = [f"One attention layer's kernel, forward + backward, {args.heads} heads of 64, fp32, one torch thread; "
            f"CPU ms per call, median of {args.repeats} timings of {args.calls} calls; "
            f"{common.versions('torch', 'transformers')}. Ratios < 1: faster than the masked call. "
            f"Prefix sharing splits rows of {prefix.SPLIT_MIN_LENGTH} positions or more (`prefix.SPLIT_MIN_LENGTH`).",
            "", *common.table(["P:C:R", "row length", "masked ms", "split ms", "causal (floor) ms", "split / masked",
                               "causal / masked", "prefix sharing uses"], rows), ""]
    command = common.command_line("split_attention_bench.py", argv)
    text = common.write_result("split_attention", "Joined pair rows: one masked attention call vs attention in parts",
                               command, body)
    common.write_json("split_attention", {"command": command, "split_min_length": prefix.SPLIT_MIN_LENGTH,
                                          "shapes": summary})
    print(text)
    return text


if __name__ == "__main__":
    main()
