"""Plan tokens and GPU memory per stage before any work starts: from config.json alone, no weights, no torch model.

    python -m leanpo_core.plan --model /models/qwen2-vl-7b --config run.yaml --gpus 8 --gpu-memory-gib 80
    python -m leanpo_core.plan --model qwen2-vl-2b --frames 16,32,64 --json     # a published shape (PUBLISHED)
    leanpo plan --model /tmp/toy-qwen2vl --frames 8,64                           # the same, through the CLI

For each frame count it prints the video tokens, the tokens per sequence, the parameters (vision tower, projector,
language model; trainable or frozen as the TrainConfig says) and the estimated peak memory per GPU of: the LeanPO
training step (the lean path: vision tower once per pair, logits only at response positions), the naive step for
comparison (vision tower once per sequence, full-vocabulary logits), the reflect and evaluate scoring forwards, and
vLLM sampling; a setting that does not fit says the nearest one that does.

The shapes come from leanpo_core/shapes.py (config.json, or PUBLISHED), the bytes from the memory model in
leanpo_core/memory.py (its docstring gives every term). A setting fits when its peak is at most 95% of the GPU's
memory less 1 GiB (CUDA context, cuBLAS workspace, NCCL buffers; the caching allocator's fragmentation). The
estimate against measurements: README "Planning memory before a run" (the bench/video_step_bench.py toy and the H100
figures of docs/method.md section 7).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from leanpo_core.config import (ConfigError, EvaluateConfig, FramesConfig, ReflectConfig, SampleConfig,
                                TrainConfig, read_document)
from leanpo_core.decode import output_size
from leanpo_core.memory import (GIB, VLLM_GPU_MEMORY_UTILIZATION, Step, scoring_memory, train_memory,
                                training_setup, usable_bytes, vllm_memory)
from leanpo_core.shapes import PUBLISHED, ModelSpec, param_counts, read_model, video_tokens

CHUNK = 4096  # the logits_chunk_size suggested when the response logits do not fit


# ---------------------------------------------------------------- the plan


@dataclasses.dataclass
class Stages:
    """The stage configs the plan reads (a `leanpo run` config's sections; defaults where a section is absent)."""

    train: TrainConfig
    frames: FramesConfig
    sample: SampleConfig
    reflect: ReflectConfig
    evaluate: EvaluateConfig


def read_stages(path: str | Path | None, model: str) -> Stages:
    """Stages from a YAML/JSON file with sections train/frames/sample/reflect/evaluate (others are ignored, as
    `manifest` or `root` of a pipeline config); `model` fills train.model and sample.model where absent."""
    data = read_document(path) if path is not None else {}
    return stages_from(data, model, str(path))


def stages_from(data: dict, model: str, source: str = "config") -> Stages:
    """Stages from a mapping of sections (mappings or the stage config objects a validated flow holds); `model`
    fills train.model and sample.model where absent."""
    from pydantic import BaseModel, ValidationError

    sections = {}
    for name, cls in (("train", TrainConfig), ("frames", FramesConfig), ("sample", SampleConfig),
                      ("reflect", ReflectConfig), ("evaluate", EvaluateConfig)):
        section = data.get(name) or {}
        values = section.model_dump(exclude_unset=True) if isinstance(section, BaseModel) else dict(section)
        if name in ("train", "sample"):
            values.setdefault("model", model)
        try:
            sections[name] = cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(f"invalid config {source} [{name}]:\n{exc}") from exc
    return Stages(**sections)


def run_model(data: dict) -> str:
    """The model a run config trains or samples with (train.model, else sample.model): the one its plan is for."""
    for name in ("train", "sample"):
        section = data.get(name) or {}
        model = getattr(section, "model", None) if not isinstance(section, dict) else section.get("model")
        if model:
            return str(model)
    raise ConfigError("the config names no model (train.model or sample.model): nothing to plan")


def plan_run(data: dict, gpus: int = 1, gpu_memory_gib: float = 80.0, source: str = "config") -> tuple[Plan, list]:
    """The plan of a `leanpo run` config and the rows that would not fit (the naive training step, shown for
    comparison, is never one of them): what `leanpo run --plan` prints and refuses on."""
    model = run_model(data)
    result = plan(read_model(model), stages_from(data, model, source), gpus, gpu_memory_gib)
    return result, [r for r in result.rows if not r.fits and r.stage != "train (naive step)"]


@dataclasses.dataclass
class Row:
    """One stage at one frame count."""

    stage: str
    frames: int
    video_tokens: int
    tokens: int  # per sequence: prompt (video + text) + response
    setting: str
    peak_gib: float
    parts_gib: dict[str, float]
    fits: bool
    advice: str = ""
    peak_phase: str = ""  # training: the part of the step where the peak falls


@dataclasses.dataclass
class Plan:
    """The report: the model, the GPUs, parameters by part, and one Row per stage and frame count."""

    model: str
    family: str
    gpus: int
    gpu_memory_gib: float
    usable_gib: float
    frame_size: tuple[int, int]  # (width, height) the processor receives
    params: dict[str, int]
    rows: list[Row]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _gib(parts: dict) -> dict[str, float]:
    return {k: round(v / GIB, 2) for k, v in parts.items()
            if isinstance(v, (int, float)) and k not in ("trainable", "kv_per_token")}


def _scoring_bf16(config) -> bool:
    """Whether a scoring stage keeps bf16 weights on the planned GPU: `scoring_precision` naming bf16, or `auto`
    (bf16 on a CUDA device with native bf16, which the plan assumes) unless the stage's device is the CPU."""
    value = str(getattr(config, "scoring_precision", None) or getattr(config, "precision", None) or "fp32")
    return "bf16" in value or (value == "auto" and getattr(config, "device", "auto") != "cpu")


class _Trainer:
    """Training estimates of one model under one set of stage configs, with the knobs the advice turns."""

    def __init__(self, spec: ModelSpec, stages: Stages, size: tuple[int, int], prompt_tokens: int, response: int,
                 gpus: int, zero: int | None | str):
        self.spec, self.stages, self.size = spec, stages, size
        self.prompt_tokens, self.response = prompt_tokens, response
        t = stages.train
        stage = {"none": None, "zero2": 2, "zero3": 3}[t.deepspeed] if zero == "config" else zero
        self.knobs = dict(checkpointing=t.gradient_checkpointing, chunk=t.logits_chunk_size,
                          pairs=t.per_device_batch_size, zero=stage, gpus=gpus, lora=t.lora)

    def prompt(self, frames: int) -> int:
        return video_tokens(self.spec, frames, *self.size)[0] + self.prompt_tokens

    def tokens(self, frames: int) -> tuple[int, int, int, int]:
        """(video tokens, patches, tokens per sequence, scored response tokens) under train.max_length."""
        video, patches = video_tokens(self.spec, frames, *self.size)
        prompt = video + self.prompt_tokens
        length = prompt + self.response
        if prompt < self.stages.train.max_length:  # the trainer cuts the response tail past max_length
            length = min(length, self.stages.train.max_length)
        return video, patches, length, length - prompt

    def memory(self, frames: int, lean: bool = True, **changes) -> dict:
        k = {**self.knobs, **changes}
        video, patches, length, response = self.tokens(frames)
        setup = training_setup(self.stages.train, k["gpus"], k["zero"])
        step = Step(pairs=k["pairs"], tokens=length, response=response, patches=patches, video_tokens=video,
                    checkpointing=k["checkpointing"], chunk=k["chunk"],
                    lora_rank=self.stages.train.lora_rank if k["lora"] else 0,
                    vision_trains=not self.stages.train.freeze_vision, lean=lean,
                    prefix_shared=lean and self.stages.train.prefix_sharing)
        return train_memory(self.spec, setup, step)

    def setting(self) -> str:
        k = self.knobs
        parts = [training_setup(self.stages.train, k["gpus"], k["zero"]).name, f"{k['gpus']} GPU(s)",
                 f"{k['pairs']} pair(s)/GPU", "checkpointing" if k["checkpointing"] else "no checkpointing"]
        parts += [f"logits chunk {k['chunk']}"] if k["chunk"] else []
        parts += [f"LoRA r{self.stages.train.lora_rank}"] if k["lora"] else []
        return ", ".join(parts)

    def advice(self, frames: int, usable: float) -> str:
        """The nearest setting that fits (fewest changes, then fewest GPUs), and the most frames that fit as is."""
        k = self.knobs
        groups: list[list[tuple[str, dict]]] = [
            [("gradient_checkpointing: true", {"checkpointing": True})] if not k["checkpointing"] else [],
            [(f"logits_chunk_size: {CHUNK}", {"chunk": CHUNK})] if not k["chunk"] else [],
            [("per_device_batch_size: 1", {"pairs": 1})] if k["pairs"] > 1 else [],
            [] if k["lora"] else ([("deepspeed: zero3", {"zero": 3})] if k["zero"] != 3 else [])
            + [(f"deepspeed: zero3 over >= {g} GPUs", {"zero": 3, "gpus": g}) for g in (2, 4, 8, 16, 32, 64)
               if g > k["gpus"]]
            + [("lora: true", {"lora": True, "zero": 2 if k["zero"] == 3 else k["zero"]})],
        ]
        combos = [[c for c in combo if c] for combo in itertools.product(*[[None, *g] for g in groups])]
        combos.sort(key=lambda combo: (len(combo), max([c[1].get("gpus", 0) for c in combo], default=0)))

        def fits(combo) -> bool:
            return self.memory(frames, **{key: v for _, change in combo for key, v in change.items()})["peak"] <= usable

        fitting = [combo for combo in combos if combo and fits(combo)]
        full = next((c for c in fitting if not any("lora" in change for _, change in c)), None)
        lora = next((c for c in fitting if any("lora" in change for _, change in c)), None)
        advice = []
        more_gpus = full is not None and any("gpus" in change for _, change in full)
        for combo in (full, lora if full is None or more_gpus or len(lora or ()) < len(full) else None):
            if combo:
                text = " + ".join(t for t, _ in combo)
                advice.append(f"{'needs' if 'GPUs' in text else 'fits with'} {text}")
        step = self.spec.temporal_patch
        fewer = next((f for f in range(frames - 1, 0, -1) if f % step == 0 and self.memory(f)["peak"] <= usable), None)
        advice += [f"reduce num_frames to {fewer}"] if fewer else []
        return "; or ".join(advice) or "does not fit in any setting tried"


def plan(spec: ModelSpec, stages: Stages, gpus: int = 1, gpu_memory_gib: float = 80.0,
         frame_counts: list[int] | None = None, frame_size: tuple[int, int] | None = None,
         prompt_tokens: int = 64, response_tokens: int | None = None, zero: int | None | str = "config") -> Plan:
    """Tokens and peak memory per GPU of every GPU stage at each frame count, with advice where one does not fit.

    frame_size: the videos' (width, height) before frames.max_side (default: square max_side frames, the most
    pixels a max_side allows); prompt_tokens: chat template and question around the video; response_tokens:
    default sample.max_new_tokens + the end-of-reply token.
    """
    f = stages.frames
    counts = frame_counts or [f.num_frames if f.sampling == "uniform" else f.max_frames]
    source = frame_size or (f.max_side, f.max_side)
    size = output_size(source[0], source[1], f.max_side)
    response = response_tokens or stages.sample.max_new_tokens + 1
    usable = usable_bytes(gpu_memory_gib)
    trainer = _Trainer(spec, stages, size, prompt_tokens, response, gpus, zero)
    rows = []
    for frames in counts:
        video, patches, _, _ = trainer.tokens(frames)
        prompt = video + prompt_tokens
        rows += _train_rows(trainer, frames, usable)
        rows += [_scoring_row(spec, stage, config, frames, video, prompt, response, patches, usable)
                 for stage, config in (("reflect scoring", stages.reflect), ("evaluate scoring", stages.evaluate))]
        s, e = stages.sample, stages.evaluate
        for stage, tp, max_len, seqs, needed in (
                ("sample (vLLM)", s.tensor_parallel_size, s.max_model_len, s.max_num_seqs, prompt + 2 * response),
                ("evaluate answers (vLLM)", 1, e.max_model_len, 16, prompt + e.max_new_tokens)):
            rows.append(_vllm_row(spec, stage, frames, video, needed, tp, max_len, seqs, patches, gpu_memory_gib))
    params = param_counts(spec)
    counts_by_part = {"vision": params.vision, "projector": params.projector, "language": params.language,
                      "lm_head": params.lm_head, "total": params.total,
                      "trainable": int(trainer.memory(counts[0])["trainable"])}
    return Plan(spec.name, spec.family, gpus, gpu_memory_gib, round(usable / GIB, 2), size, counts_by_part, rows)


def _train_rows(trainer: _Trainer, frames: int, usable: float) -> list[Row]:
    """The lean step (with advice when it does not fit or max_length cuts it) and the naive step."""
    video, _, length, scored = trainer.tokens(frames)
    prompt, max_length = trainer.prompt(frames), trainer.stages.train.max_length
    lean = trainer.memory(frames)
    notes = [] if lean["peak"] <= usable else [trainer.advice(frames, usable)]
    if prompt >= max_length:
        shorter = next((f for f in range(frames - 1, 0, -1) if trainer.prompt(f) < max_length), None)
        notes.insert(0, f"the prompt alone has {prompt} tokens: raise max_length to >= {prompt + trainer.response}"
                     + (f" or reduce num_frames to {shorter}" if shorter else ""))
    elif scored < trainer.response:
        notes.insert(0, f"responses cut to {scored} tokens by max_length")
    if trainer.spec.max_positions and length > trainer.spec.max_positions:
        notes.append(f"beyond the model's {trainer.spec.max_positions} positions")
    naive = trainer.memory(frames, lean=False)
    return [Row(stage, frames, video, length, trainer.setting(), round(mem["peak"] / GIB, 2), _gib(mem),
                mem["peak"] <= usable and prompt < max_length, note, mem["peak_phase"])
            for stage, mem, note in (("train (lean step)", lean, "; ".join(notes)),
                                     ("train (naive step)", naive, ""))]


def _scoring_row(spec: ModelSpec, stage: str, config, frames: int, video: int, prompt: int, response: int,
                 patches: int, usable: float) -> Row:
    """A likelihood-scoring stage (reflect, evaluate) at its batch_size, or the largest batch_size that fits."""
    bf16 = _scoring_bf16(config)

    def peak(batch: int, half: bool = bf16) -> float:
        return scoring_memory(spec, batch, prompt + response, response, patches, half)["peak"]

    mem = scoring_memory(spec, config.batch_size, prompt + response, response, patches, bf16)
    fit = mem["peak"] <= usable
    smaller = None if fit else next((b for b in range(config.batch_size - 1, 0, -1) if peak(b) <= usable), None)
    notes = [] if fit else [f"reduce batch_size to {smaller}" if smaller else "does not fit at batch_size 1"]
    if not fit and not bf16 and peak(config.batch_size, True) <= usable:
        notes.append(f"bf16 weights would fit ({peak(config.batch_size, True) / GIB:.1f} GiB)")
    note = "; ".join(notes)
    return Row(stage, frames, video, prompt + response, f"{'bf16' if bf16 else 'fp32'} weights, batch "
               f"{config.batch_size}", round(mem["peak"] / GIB, 2), _gib(mem), fit, note)


def _vllm_row(spec: ModelSpec, stage: str, frames: int, video: int, needed: int, tp: int, max_len: int, seqs: int,
              patches: int, gpu_memory_gib: float) -> Row:
    """A vLLM stage: weights + profiling forward + KV cache of one max_model_len sequence within its budget."""
    budget = VLLM_GPU_MEMORY_UTILIZATION * gpu_memory_gib * GIB
    mem = vllm_memory(spec, tp, max_len, seqs, patches)
    notes = [] if needed <= max_len else [f"max_model_len {max_len} < {needed} tokens (video, prompt, reply"
                                          f"{' and reflection reply' if stage.startswith('sample') else ''}): "
                                          f"raise max_model_len to >= {needed}"]
    fit = mem["peak"] <= budget
    if fit and not notes:
        room = (budget - mem["peak"] + mem["kv_per_token"] * max_len) // (mem["kv_per_token"] * max_len)
        notes.append(f"KV cache holds {int(room)} sequences of max_model_len at once")
    elif not fit:
        wider = next((t for t in (2, 4, 8)
                      if t > tp and vllm_memory(spec, t, max_len, seqs, patches)["peak"] <= budget), None)
        notes.append(f"needs tensor_parallel_size: {wider}" if wider else "does not fit with tensor parallelism <= 8")
    return Row(stage, frames, video, needed, f"bf16, TP {tp}, max_model_len {max_len}, gpu_memory_utilization "
               f"{VLLM_GPU_MEMORY_UTILIZATION}", round(mem["peak"] / GIB, 2), _gib(mem), fit and needed <= max_len,
               "; ".join(notes))


# ---------------------------------------------------------------- output and CLI


def render(result: Plan, width: int | None = None) -> str:
    """The plan as text: the model's parameters, each stage's setting, then one table row per stage and frame count."""
    import io as _io

    from rich import box
    from rich.console import Console
    from rich.table import Table

    m = {k: f"{v / 1e6:,.1f}M" for k, v in result.params.items()}
    head = m["lm_head"] if result.params["lm_head"] else "tied"
    lines = [f"{result.model} ({result.family}): {m['total']} parameters = vision {m['vision']} + projector "
             f"{m['projector']} + language model {m['language']} + LM head {head}; trainable {m['trainable']}",
             f"{result.gpus} GPU(s) x {result.gpu_memory_gib:g} GiB (a torch process may allocate "
             f"{result.usable_gib:g} GiB); frames reach the processor as {result.frame_size[0]}x"
             f"{result.frame_size[1]}"]
    lines += [f"  {stage}: {setting}" for stage, setting in dict((r.stage, r.setting) for r in result.rows).items()]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("stage", "frames", "video tokens", "tokens/seq", "peak GiB/GPU", "fits", "advice"):
        table.add_column(name, overflow="fold")
    order = list(dict.fromkeys(r.stage for r in result.rows))
    for r in sorted(result.rows, key=lambda r: (order.index(r.stage), r.frames)):
        table.add_row(r.stage, str(r.frames), str(r.video_tokens), str(r.tokens), f"{r.peak_gib:.1f}",
                      "yes" if r.fits else "NO", r.advice)
    console = Console(file=_io.StringIO(), width=width or 120, record=True, color_system=None)
    console.print("\n".join(lines), highlight=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


def _frame_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> Plan:
    """CLI: print the plan (or its JSON); exit 2 on a bad model or config."""
    parser = argparse.ArgumentParser(prog="leanpo plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=f"model folder, its config.json, or one of {sorted(PUBLISHED)}")
    parser.add_argument("--config", help="YAML/JSON with sections train/frames/sample/reflect/evaluate (a `leanpo "
                        "run` config; other keys are ignored)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs training runs on (default 1)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU (default 80)")
    parser.add_argument("--frames", help="comma-separated frame counts (default: the frames config's)")
    parser.add_argument("--frame-size", type=_frame_size, metavar="WxH", help="source frame size before "
                        "frames.max_side (default: square max_side frames, the most tokens a max_side allows)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens around the video (default 64)")
    parser.add_argument("--response-tokens", type=int, help="tokens per response (default: sample.max_new_tokens+1)")
    parser.add_argument("--zero", choices=["none", "0", "1", "2", "3"], help="ZeRO stage instead of train.deepspeed")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    try:
        spec = read_model(args.model)
        stages = read_stages(args.config, args.model)
        counts = [int(x) for x in args.frames.split(",")] if args.frames else None
    except (ConfigError, ValueError) as exc:
        print(f"leanpo plan: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    zero: Any = "config" if args.zero is None else (None if args.zero == "none" else int(args.zero))
    result = plan(spec, stages, args.gpus, args.gpu_memory_gib, counts, args.frame_size, args.prompt_tokens,
                  args.response_tokens, zero)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(render(result, shutil.get_terminal_size().columns if sys.stdout.isatty() else None), end="")
    return result


if __name__ == "__main__":
    main()
