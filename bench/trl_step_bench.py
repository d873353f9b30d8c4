"""Text preference step: this project's LeanPO step vs TRL's DPOTrainer (with its reference model) and TRL's SimPO.

    .venv/bin/python bench/trl_step_bench.py [--shapes 512:64 2048:256] [--steps 2] [--rounds 2] [--threads 1]

Same random Qwen2-shaped causal LM (hidden 128, 4 layers, head_dim 64, vocabulary 4096: output-projection FLOPs per
token 0.5x the layers', Qwen2.5-0.5B: 0.38x), saved once as safetensors under bench/.cache/ and loaded by every
side; same pairs (--pairs per step, prompts of P tokens, chosen and rejected responses of R tokens plus the end
token, from a word-level tokenizer so the counts are exact); fp32 on CPU, gradient checkpointing (non-reentrant),
AdamW, lr 1e-6, one optimizer step per batch:

  leanpo  this project: `prefix.pair_logps` as the trainer's default pair forward runs it (one `[prompt | chosen |
          rejected]` row per pair: the prompt read once; backbone hidden states, logits only at response positions)
          + `loss.leanpo_loss` + backward + AdamW step (a plain loop: the project's Trainer subclass adds nothing
          per step that matters at these step times)
  dpo     TRL `DPOTrainer` (sigmoid loss, beta 0.1), its reference model a frozen copy run every step (the default)
  simpo   TRL's reference-free SimPO: in TRL 1.x `trl.experimental.cpo.CPOTrainer` with loss_type="simpo",
          cpo_alpha=0 (SimPO proper: no NLL term), beta 2, gamma 0.5

TRL lives in its own venv, bench/.cache/trl-venv, created on first use (`python -m venv` + pip install of the pinned
trl and torch; it resolves its own transformers, recorded in the results). Each (shape, side) runs in a fresh child
process (TRL sides under that venv's python): --warmup untimed steps, then --steps timed ones (TRL: a TrainerCallback
times on_step_begin -> on_step_end, so dataset tokenisation and set-up are excluded). Peak memory: VmHWM above the
RSS just before the first step (both models, TRL's reference included, are loaded by then). Children run in
alternating order over --rounds rounds; medians. Writes bench/results/trl_step.md and trl_step.json (per shape:
`leanpo_over_simpo_cpu` and the other ratios, the sides' CPU/wall ms and memory).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (stdlib only: it also runs under the TRL venv)

TRL_PIN = "trl==1.16.0"
TORCH_PIN = "torch==2.13.0"  # the CPU build; an unpinned torch pulls a multi-GB CUDA one
SIDES = ("leanpo", "dpo", "simpo")
TRL_VENV = common.CACHE / "trl-venv"


def trl_python() -> str:
    """The TRL venv's python, creating the venv on first use (about a minute)."""
    python = TRL_VENV / "bin" / "python"
    stamp = TRL_VENV / f".ok-{TRL_PIN}-{TORCH_PIN}"
    if not stamp.exists():
        common.ensure_cache()
        print(f"creating {TRL_VENV} ({TRL_PIN}, {TORCH_PIN})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", TORCH_PIN,
                        TRL_PIN], check=True)
        stamp.write_text("")
    return str(python)


def build_model(folder: Path, hidden: int, layers: int, vocab: int) -> Path:
    """A word-level tokenizer ("w0".."w{vocab-3}", pad, eos) and a random Qwen2 causal LM, saved once."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    if (folder / "done").exists():
        return folder
    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(vocab - 2)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=8192, tie_word_embeddings=False,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1, use_cache=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    (folder / "done").write_text("")
    return folder


def pair_texts(args, index: int) -> dict:
    """Pair `index`: prompt of P words, chosen and rejected of R words (each word one token); seeded."""
    import random

    rng = random.Random(index)
    words = lambda n: " ".join(f"w{rng.randrange(args.vocab - 2)}" for _ in range(n))  # noqa: E731
    return {"prompt": words(args.prompt), "chosen": " " + words(args.response),
            "rejected": " " + words(args.response)}


def check_lengths(tok, args) -> None:
    """Every word must be one token, or the shapes in the table would be wrong."""
    texts = pair_texts(args, 0)
    got = [len(tok(texts[k], add_special_tokens=False)["input_ids"]) for k in ("prompt", "chosen")]
    if got != [args.prompt, args.response]:
        raise RuntimeError(f"tokenizer gives {got} tokens for {[args.prompt, args.response]} words")


def child_leanpo(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    sys.path.insert(0, str(common.ROOT))
    from leanpo_core import loss, pairdata, prefix

    tok = PreTrainedTokenizerFast.from_pretrained(args.model)  # AutoTokenizer would pick Qwen2Tokenizer
    check_lengths(tok, args)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_safetensors=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)

    def encode(prompt: str, response: str) -> dict:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + r])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor([[-100] * len(p) + r])}

    texts = [pair_texts(args, i) for i in range(args.pairs)]
    items = [{"chosen": encode(t["prompt"], t["chosen"]), "rejected": encode(t["prompt"], t["rejected"]),
              "chosen_baseline": float("nan"), "rejected_baseline": float("nan")} for t in texts]
    batch = pairdata.PairCollator(tok.pad_token_id, prefix_sharing=True)(items)

    def step() -> None:
        sums, counts = prefix.pair_logps(model, None, batch)
        half = sums.shape[0] // 2
        out = loss.leanpo_loss(sums[:half], counts[:half], sums[half:], counts[half:])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rss_before = common.proc_status_kib("VmRSS")
    common.reset_peak_rss()
    for _ in range(args.warmup):
        step()
    times, cpu_times = common.time_steps(step, args.steps)
    peak = common.proc_status_kib("VmHWM")
    return {"times": times, "cpu_times": cpu_times, "peak_delta_mib": (peak - rss_before) / 1024,
            "peak_mib": peak / 1024, "tokens": int(batch["input_ids"].numel())}


def child_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback

    tok = PreTrainedTokenizerFast.from_pretrained(args.model)  # AutoTokenizer would pick Qwen2Tokenizer
    check_lengths(tok, args)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_safetensors=True)
    total = args.warmup + args.steps
    dataset = Dataset.from_list([pair_texts(args, i % args.pairs) for i in range(total * args.pairs)])
    times, cpu_times, marks = [], [], {}

    class Timer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            marks["rss_before"] = common.proc_status_kib("VmRSS")
            common.reset_peak_rss()

        def on_step_begin(self, *_, **__):
            marks["start"], marks["cpu"] = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - marks["start"])
            cpu_times.append(time.process_time() - marks["cpu"])

    common_args = dict(output_dir=str(common.CACHE / "trl-out"), per_device_train_batch_size=args.pairs,
                       max_steps=total, learning_rate=1e-6, lr_scheduler_type="constant", weight_decay=0.0,
                       logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                       gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                       dataloader_num_workers=0, seed=0)
    if args.side == "dpo":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**common_args, beta=0.1, loss_type="sigmoid", max_length=None)
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                             callbacks=[Timer()])
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        config = CPOConfig(**common_args, loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5,
                           max_length=args.prompt + args.response + 8)
        trainer = CPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                             callbacks=[Timer()])
    trainer.train()
    import transformers
    import trl

    peak = common.proc_status_kib("VmHWM")
    return {"times": times[args.warmup:], "cpu_times": cpu_times[args.warmup:],
            "peak_delta_mib": (peak - marks["rss_before"]) / 1024, "peak_mib": peak / 1024,
            "versions": f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}"}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["512:64", "2048:256"],
                        help="PROMPT:RESPONSE token counts to measure")
    parser.add_argument("--pairs", type=int, default=1, help="pairs per step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per child")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per child")
    parser.add_argument("--rounds", type=int, default=2, help="children per (shape, side), in rotating order")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (head_dim 64)")
    parser.add_argument("--layers", type=int, default=4, help="layers")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prompt", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--response", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        args.side = args.child
        common.emit(child_leanpo(args) if args.child == "leanpo" else child_trl(args))
        return ""

    shape = dict(hidden=args.hidden, layers=args.layers, vocab=args.vocab)
    key = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
    folder = build_model(common.ensure_cache() / f"trl-step-qwen2-{key}", **shape)
    python = {"leanpo": sys.executable, "dpo": trl_python(), "simpo": trl_python()}
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    results: dict[tuple[str, str], list[dict]] = {}
    for spec in args.shapes:
        prompt, response = (int(x) for x in spec.split(":"))
        for r in range(args.rounds):
            order = SIDES[r % 3:] + SIDES[:r % 3]
            for side in order:
                out = common.run_child([__file__, "--child", side, "--model", str(folder), "--prompt", str(prompt),
                                        "--response", str(response), "--pairs", str(args.pairs), "--steps",
                                        str(args.steps), "--warmup", str(args.warmup), "--vocab", str(args.vocab),
                                        "--threads", str(args.threads)], python=python[side], env=env)
                results.setdefault((spec, side), []).append(out)
                print(f"{spec} {side:6s} round {r}: step {common.median(out['times']):.3f} s, "
                      f"peak +{out['peak_delta_mib']:.0f} MiB", flush=True)

    rows, verdicts, summary = [], [], {}
    for spec in args.shapes:
        t = {s: common.median([x for o in results[(spec, s)] for x in o["times"]]) for s in SIDES}
        c = {s: common.median([x for o in results[(spec, s)] for x in o["cpu_times"]]) for s in SIDES}
        m = {s: common.median([o["peak_delta_mib"] for o in results[(spec, s)]]) for s in SIDES}
        a = {s: common.median([o["peak_mib"] for o in results[(spec, s)]]) for s in SIDES}
        rows.append([spec.replace(":", " + "), *(f"{1000 * t[s]:.0f}" for s in SIDES),
                     f"{t['leanpo'] / t['dpo']:.2f}", f"{t['leanpo'] / t['simpo']:.2f}",
                     *(f"{1000 * c[s]:.0f}" for s in SIDES),
                     f"**{c['leanpo'] / c['dpo']:.2f}**", f"**{c['leanpo'] / c['simpo']:.2f}**",
                     *(f"{m[s]:.0f}" for s in SIDES), f"{m['leanpo'] / m['dpo']:.2f}",
                     f"**{m['leanpo'] / m['simpo']:.2f}**", *(f"{a[s]:.0f}" for s in SIDES)])
        summary[spec] = {"leanpo_over_simpo_cpu": round(c["leanpo"] / c["simpo"], 3),
                         "leanpo_over_dpo_cpu": round(c["leanpo"] / c["dpo"], 3),
                         "leanpo_over_simpo_wall": round(t["leanpo"] / t["simpo"], 3),
                         "leanpo_over_simpo_memory": round(m["leanpo"] / m["simpo"], 3),
                         "cpu_ms": {s: round(1000 * c[s], 1) for s in SIDES},
                         "wall_ms": {s: round(1000 * t[s], 1) for s in SIDES},
                         "peak_delta_mib": {s: round(m[s], 1) for s in SIDES}}
        if spec == args.shapes[-1]:
            for label, ratio, target in (("leanpo / DPO step (CPU time)", c["leanpo"] / c["dpo"], 0.75),
                                         ("leanpo / DPO step (wall)", t["leanpo"] / t["dpo"], 0.75),
                                         ("leanpo / SimPO step (CPU time)", c["leanpo"] / c["simpo"], 0.6),
                                         ("leanpo / SimPO step (wall)", t["leanpo"] / t["simpo"], 0.6),
                                         ("leanpo / SimPO peak memory", m["leanpo"] / m["simpo"], 0.7)):
                verdicts.append(f"{label} {ratio:.2f} (target <= {target}: {'met' if ratio <= target else 'missed'})")
    trl_versions = results[(args.shapes[0], "dpo")][0]["versions"]
    body = [f"Model: random Qwen2 causal LM, hidden {args.hidden} x {args.layers} layers, vocabulary {args.vocab}, "
            f"fp32, gradient checkpointing, AdamW; {args.pairs} pair(s) per step; torch threads "
            f"{args.threads or 'default'}. Project side: {common.versions('torch', 'transformers')}; TRL side: "
            f"{trl_versions}. Each (shape, side) in a fresh process, {args.rounds} round(s) in rotating order, "
            f"{args.warmup} warm-up + {args.steps} timed steps each; medians. Peak = VmHWM above the RSS just "
            "before the first step (TRL DPO's reference model is loaded by then, so it is not in the delta; "
            "gradients and AdamW state are). CPU time = the child's process time per step: with one torch thread, "
            "what the step costs, far less disturbed than wall time by other jobs on the cores: with a load "
            "average above the core count, other jobs shared the cores, so read the CPU-time ratios.", "",
            *common.table(["prompt + response tokens", "leanpo ms", "TRL DPO ms", "TRL SimPO ms", "leanpo / DPO",
                           "leanpo / SimPO", "leanpo CPU ms", "DPO CPU ms", "SimPO CPU ms", "leanpo / DPO (CPU)",
                           "leanpo / SimPO (CPU)", "leanpo peak MiB", "DPO peak MiB", "SimPO peak MiB",
                           "leanpo / DPO memory", "leanpo / SimPO memory", "leanpo process peak MiB",
                           "DPO process peak MiB", "SimPO process peak MiB"], rows), "",
            "Process peak: the whole child's VmHWM (interpreter, libraries, weights, TRL's reference copy); the "
            "two venvs import different library versions, so read the delta columns for the step itself.", "",
            f"At {args.shapes[-1].replace(':', ' + ')} tokens: " + "; ".join(verdicts) + ".", ""]
    text = common.write_result("trl_step", "Text preference step: LeanPO vs TRL DPO and SimPO",
                               common.command_line("trl_step_bench.py", argv), body)
    common.write_json("trl_step", {"command": common.command_line("trl_step_bench.py", argv), "trl": trl_versions,
                                   "targets_at_last_shape": {"leanpo_over_simpo_cpu": 0.6, "leanpo_over_dpo_cpu": 0.75,
                                                             "leanpo_over_simpo_memory": 0.7},
                                   "shapes": summary})
    print(text)
    return text


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
