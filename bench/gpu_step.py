"""Video training step on one GPU: this project's trainer step vs a minimal hand-written step vs DPO with a reference.

    python bench/gpu_step.py                      # one H100/H200: bf16, ~2-4 min, writes bench/results/gpu_step.md
    python bench/gpu_step.py --frames 16 32       # fewer configurations
    .venv/bin/python bench/gpu_step.py --smoke    # CPU, tiny sizes, seconds: exercises every side, writes nothing
                                                  # under results/ (bench/.cache/gpu_step_smoke.md)

Needs only torch, transformers and this repository (no vLLM, DeepSpeed or TRL), and no network: the model is built
from a config with random weights. Model: a Qwen2-VL whose language model has Qwen2.5-0.5B's shape (hidden 896,
24 layers, 14 heads / 2 KV heads, MLP 4864, vocabulary 151936, tied embeddings) and Qwen2-VL's vision tower
(1280 wide, 32 blocks, frozen), bf16 weights (no fp32 master copy), gradient checkpointing, fused AdamW (lr 1e-6).
Batch: one pair, a random-pixel 448x448 video of --frames frames (256 video tokens per 2 frames), a short question,
chosen and rejected responses of --response-tokens tokens. Four sides, all on the same model and pair:

  project      `train.PairPolicy` + `train.objective_loss` (LeanPO), as the Trainer's compute_loss by default: one
               `[prompt | chosen | rejected]` row per pair (prefix sharing: the prompt's video tokens through the
               language model once), the vision tower once, logits only at response positions
  vision_once  the same with `prefix_sharing` off: two rows per pair, the vision tower once
  handwritten  a minimal PyTorch step: `model.model(...)` on both sequences (each with its own copy of the video),
               hidden states gathered at response positions, LM head + fp32 log-softmax there only, the SimPO loss
               (reference-free); no project code in the step
  dpo          the project's DPO objective: the `project` forward plus a frozen bf16 reference copy's forward
               (`train.pair_logps` under no_grad) every step; the copy is on the GPU only during this side

Per side and frame count: --warmup steps, then --steps timed ones (torch.cuda.synchronize around each; median),
peak memory = torch.cuda.max_memory_allocated over the timed steps (reset before), and model TFLOP/s = useful model
FLOPs / step time, where useful FLOPs count: the trained LLM forward+backward over all tokens (6 N T, N the LLM's
non-embedding parameters, plus causal attention 6 L d S^2 per sequence), the LM head at response positions only
(6 V d R), the vision tower forward once per video (2 N_vision P, P patches), and for DPO the reference forward
(2 N T + 2 L d S^2 + 2 V d R + the vision forward). T and S are those of the pair's two separate sequences on every
side (the work a pair asks for, however a side arranges it), and recomputation by checkpointing is not counted, so
TFLOP/s is comparable across sides. The run stops starting new configurations after --budget-s seconds.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leanpo_core import models, pairdata, train  # noqa: E402
from leanpo_core.config import TrainConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
SIDES = ("project", "vision_once", "handwritten", "dpo")
FULL = dict(hidden=896, layers=24, heads=14, kv_heads=2, mlp=4864, vocab=151936, vision_embed=1280, vision_depth=32,
            vision_heads=16, size=448)
SMOKE = dict(hidden=128, layers=2, heads=2, kv_heads=1, mlp=256, vocab=4096, vision_embed=64, vision_depth=2,
             vision_heads=1, size=56)


def build(shape: dict, device: torch.device, dtype: torch.dtype):
    """(model, processor, adapter): random Qwen2-VL at `shape`, the toy tokenizer, a processor capped at size^2 px."""
    import transformers as tf

    from leanpo_core import toy

    tok = toy.build_tokenizer("qwen")
    config, _ = toy._qwen_parts("qwen2_vl", tok)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = shape["hidden"], shape["mlp"], shape["layers"]
    text.num_attention_heads, text.num_key_value_heads = shape["heads"], shape["kv_heads"]
    text.layer_types = ["full_attention"] * shape["layers"]
    text.vocab_size = shape["vocab"]
    head_dim = shape["hidden"] // shape["heads"]
    quarter = head_dim // 16  # mrope: head_dim/2 rotary frequencies split 2:3:3 over (time, height, width)
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [2 * quarter, 3 * quarter, 3 * quarter]}
    config.tie_word_embeddings = text.tie_word_embeddings = True
    vision = config.vision_config
    vision.embed_dim, vision.depth = shape["vision_embed"], shape["vision_depth"]
    vision.num_heads = shape["vision_heads"]
    vision.hidden_size, vision.mlp_ratio = shape["hidden"], 4
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForImageTextToText.from_config(config, dtype=dtype)
    pixels = dict(min_pixels=28 * 28, max_pixels=shape["size"] ** 2)
    processor = tf.Qwen2VLProcessor(image_processor=tf.Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                                    video_processor=tf.Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=False),
                                    chat_template=tok.chat_template)
    adapter = models.adapter_for(model)
    return adapter.prepare_model(model), processor, adapter


def make_batch(processor, adapter, frames: int, size: int, response_tokens: int, device,
               prefix_sharing: bool = False) -> dict:
    rng = np.random.default_rng(frames)
    clip = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    meta = models.video_metadata(clip, fps=2.0)
    prompt = adapter.build_prompt(processor, "What happens in the video, step by step?")
    words = "the red square moves left then a blue ball rises slowly".split()
    # one toy-BPE word is about one token; trim to exactly response_tokens (+ the end-of-reply token)
    responses = [" ".join(rng.choice(words, response_tokens)) for _ in range(2)]
    tokenizer = processor.tokenizer
    responses = [tokenizer.decode(tokenizer(r, add_special_tokens=False)["input_ids"][:response_tokens])
                 for r in responses]
    item = {"chosen": adapter.encode(processor, clip, prompt, responses[0], meta=meta),
            "rejected": adapter.encode(processor, clip, prompt, responses[1], meta=meta),
            "chosen_baseline": float("nan"), "rejected_baseline": float("nan")}
    batch = pairdata.PairCollator(tokenizer.pad_token_id, prefix_sharing)([item])
    return {k: v.to(device) for k, v in batch.items()}


def handwritten_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimal reference-free forward: backbone on both sequences, LM head at response positions only."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "chosen_baseline", "rejected_baseline")}
    for key in ("pixel_values_videos", "video_grid_thw"):
        inputs[key] = torch.cat([inputs[key]] * 2)
    hidden = model.model(**inputs).last_hidden_state
    labels = batch["labels"][:, 1:]
    rows, cols = (labels != -100).nonzero(as_tuple=True)
    logits = model.get_output_embeddings()(hidden[rows, cols]).float()
    token_logps = logits.log_softmax(-1).gather(-1, labels[rows, cols][:, None]).squeeze(-1)
    sums = torch.zeros(labels.shape[0], device=hidden.device).index_add(0, rows, token_logps)
    return sums, torch.bincount(rows, minlength=labels.shape[0])


def simpo(sums: torch.Tensor, counts: torch.Tensor, beta: float = 2.0, gamma: float = 0.5) -> torch.Tensor:
    rbar = sums / counts
    return -torch.nn.functional.logsigmoid(beta * (rbar[0] - rbar[1]) - gamma)


def useful_flops(model, batch: dict, dpo: bool) -> float:
    """Model FLOPs of one step as the module docstring defines them."""
    text = model.config.text_config
    d, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    lm = model.model.language_model
    n_llm = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    lengths = batch["attention_mask"].sum(-1).tolist()
    tokens, responses = sum(lengths), int((batch["labels"] != -100).sum())
    attention = sum(2 * layers * d * s * s for s in lengths)  # forward, causal
    patches = int(batch["pixel_values_videos"].shape[0])
    forward = 2 * n_llm * tokens + attention + 2 * vocab * d * responses
    vision = 2 * n_vision * patches
    return 3 * forward + vision + ((forward + vision) if dpo else 0)


def measure(side: str, model, ref_model, adapter, batch: dict, args, device, flops: float) -> dict:
    config = TrainConfig(model="bench", objective="dpo" if side == "dpo" else "leanpo")
    policy = train.PairPolicy(model, adapter)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(trainable, lr=1e-6, fused=fused)
    pair_inputs = {k: v for k, v in batch.items() if k not in pairdata.SIDE_INFO}

    def step():
        if side == "handwritten":
            loss = simpo(*handwritten_logps(model, batch))
        else:
            sums, counts = policy(**pair_inputs)
            ref = None
            if side == "dpo":
                with torch.no_grad():
                    ref, _ = train.pair_logps(ref_model, adapter, batch)
            loss = train.objective_loss(config, sums, counts, batch, ref).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    del optimizer
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    seconds = statistics.median(times)
    return {"ms": 1000 * seconds, "peak_gib": peak,
            "tflops": flops / seconds / 1e12}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64], help="frame counts")
    parser.add_argument("--response-tokens", type=int, default=256, help="tokens per response")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side and frame count")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--budget-s", type=float, default=200, help="start no new configuration after this")
    parser.add_argument("--smoke", action="store_true", help="tiny model and clips, CPU allowed, for a check")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: results/gpu_step.md, or "
                        "bench/.cache/gpu_step_smoke.md with --smoke)")
    args = parser.parse_args(argv)
    shape = SMOKE if args.smoke else FULL
    if args.smoke:
        args.frames = [f for f in args.frames if f <= 16] or [4]
        args.response_tokens, args.steps, args.warmup = min(args.response_tokens, 16), min(args.steps, 2), 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: run with --smoke on CPU")
    dtype = torch.bfloat16
    started = time.perf_counter()
    model, processor, adapter = build(shape, device, dtype)
    model.config.use_cache = False
    train._freeze_vision(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ref_model, _, _ = build(shape, device, dtype)  # initialised on the device (fast), parked on the CPU
    ref_model.load_state_dict(model.state_dict())
    ref_model.eval().requires_grad_(False).to("cpu")
    rows, skipped = [], []
    for frames in args.frames:
        if time.perf_counter() - started > args.budget_s:
            skipped.append(frames)
            continue
        batch = make_batch(processor, adapter, frames, shape["size"], args.response_tokens, device)
        joined = make_batch(processor, adapter, frames, shape["size"], args.response_tokens, device, True)
        tokens = int(batch["input_ids"].shape[1])
        results = {}
        for side in SIDES:
            if side == "dpo":  # the reference lives on the device only for its own side, so the other peaks exclude it
                ref_model.to(device)
            flops = useful_flops(model, batch, side == "dpo")
            side_batch = batch if side in ("vision_once", "handwritten") else joined
            results[side] = measure(side, model, ref_model, adapter, side_batch, args, device, flops)
            ref_model.to("cpu")
        for side in SIDES:
            r = results[side]
            ratio = r["ms"] / results["handwritten"]["ms"]
            rows.append(f"| {frames} | {tokens} | {side} | {r['ms']:.0f} | {ratio:.2f} | {r['peak_gib']:.1f} "
                        f"| {r['tflops']:.1f} |")
            print(rows[-1], flush=True)
        del batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    command = " ".join(["python bench/gpu_step.py", *(argv if argv is not None else sys.argv[1:])])
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import transformers

    lines = ["# Video training step on one GPU: project (prefix-shared) vs vision-once vs hand-written vs DPO", "",
             f"`{command}`, {now}, on {name} ({platform.node()}); torch {torch.__version__}, transformers "
             f"{transformers.__version__}; {'SMOKE sizes, numbers meaningless' if args.smoke else 'bf16'}; "
             f"{args.warmup} warm-up + {args.steps} timed steps, medians; {time.perf_counter() - started:.0f} s "
             "in all.", "",
             f"Model: Qwen2-VL, LLM hidden {shape['hidden']} x {shape['layers']} layers, vocabulary {shape['vocab']}, "
             f"vision tower {shape['vision_embed']} x {shape['vision_depth']} (frozen); {shape['size']}x"
             f"{shape['size']} frames; one pair, {args.response_tokens}-token responses.", "",
             "| frames | tokens per sequence | side | step ms | vs handwritten | peak GiB | model TFLOP/s |",
             "|---|---|---|---|---|---|---|", *rows, ""]
    if skipped:
        lines += [f"Skipped (time budget {args.budget_s:.0f} s spent): frames {skipped}.", ""]
    text = "\n".join(lines)
    out = args.out or (HERE / ".cache" / "gpu_step_smoke.md" if args.smoke else HERE / "results" / "gpu_step.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
