"""The toy world: a tiny Qwen2-VL-shaped Video-LLM that reads the synthetic clips, built offline in a few minutes.

The method starts from an instruction-tuned Video-LLM (the "SFT model"): it answers from the video and uses a hint
when one is given. No hub is reachable here, so the toy world builds one, in three recorded steps:
  1. model      `toy.build_toy_model("qwen2_vl", size="world")`: LLM hidden 128 x 4 layers, 2-layer vision tower,
                a pixel budget that gives each 24-px cell of a 96x72 clip its own merged video token.
  2. vision     pre-training of the vision tower and projector on clips rendered in memory from a pool no split
                uses: from each merged video token a linear probe must read the colour, shape and direction of
                motion of the object in its cell (a toy stand-in for a pre-trained video encoder). Then frozen.
  3. sft        instruction tuning of the language model on the `sft` split's questions, each asked plainly and once
                more with the answer as a hint or in the self-reflection turn (the two prompts the sampling stage
                asks), answers as one word. The sft split is imbalanced (`sft_skew`: each attribute takes its
                `synthetic.PRIOR` value, e.g. "red", "left", "circle", with probability 0.5 beyond chance), as
                instruction data often is; every other split is uniform. The SFT model so learns a language prior
                that competes with what it sees: the hallucination that preference training against replies from
                a lean view of the video is meant to remove.
The synthetic set has four disjoint splits (`synthetic.WORLD_SPLITS`): `sft` (what the SFT model saw), `train` (the
clips whose questions feed the preference rounds), `validation`, and `test` (nothing is tuned on it).

The result is content-keyed: `world.json` records the settings, the data, what each step measured (validation
accuracy per question type beside the video-blind baselines) and a key over the settings and the code that builds
the world. `ensure_world` reuses the model shipped in `leanpo_core/assets/toy_world` when its key matches, else a
built copy under the cache folder, else builds one.

    python -m leanpo_core.toyworld build --out runs/toy-world        # ~3-4 min on 2 cores
    python -m leanpo_core.toyworld manifest --out data/world --only train test
    python -m leanpo_core.toyworld show leanpo_core/assets/toy_world
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import inspect
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from leanpo_core import prompts, synthetic, toy

ASSET = Path(__file__).resolve().parent / "assets" / "toy_world"
POOL_OFFSET = 10**6  # pre-training clips are drawn at indices from here on: no split of the world's set shares one
GRID = (synthetic.HEIGHT // synthetic.CELL) * (synthetic.WIDTH // synthetic.CELL)  # 3 x 4 cells = tokens per step


@dataclasses.dataclass(frozen=True)
class WorldSettings:
    """Everything that decides the toy world's model; its hash (with the code's) is the content key."""

    seed: int = 0  # synthetic set and weights
    clips: int = 800  # clips of the synthetic set (split by synthetic.WORLD_SPLITS)
    questions_per_clip: int = 3  # motion clips have 3 questions, count clips 2
    frames: int = 8  # uniformly sampled per clip, as the pipeline's frames stage samples them
    pretrain_clips: int = 1200
    pretrain_epochs: int = 5
    pretrain_lr: float = 3e-3
    sft_skew: float = 0.5  # the sft split is imbalanced (synthetic.skewed_params): the SFT model learns a prior
    sft_epochs: int = 3
    sft_lr: float = 1e-3
    batch_size: int = 8

    def key(self) -> str:
        """sha256 over these settings and the code that shapes the world's model: the build steps here, how clips are
        drawn and asked about, the toy's architecture and tokenizer, the prompt texts, how a prompt is encoded and
        which frames are sampled. Other edits leave the key, and so the shipped model, alone."""
        from leanpo_core import decode, models

        parts = [json.dumps(dataclasses.asdict(self), sort_keys=True),
                 repr((synthetic.WORLD_SPLITS, synthetic.PALETTE, synthetic.SHAPES, synthetic.DIRECTIONS,
                       synthetic.BACKGROUND, synthetic.HEIGHT, synthetic.WIDTH, synthetic.NUM_FRAMES, toy.SIZES,
                       toy._SHAPES, toy._COLOURS, toy._MOTIONS, toy._GENERAL, toy._TEMPLATES, toy._TOKENIZERS,
                       synthetic.PRIOR, prompts.HINT, prompts.REFLECTION))]
        parts += [inspect.getsource(f) for f in (
            split_questions, clip_frames, cell_targets, _pretrain_vision, _sft_items, _sft, build_world,
            synthetic.draw_params, synthetic.motion_path, synthetic._mask, synthetic.render_clip, synthetic.questions,
            synthetic.split_of, synthetic.scene, synthetic.skewed_params, synthetic.question_type, toy._corpus,
            toy.build_tokenizer, toy._qwen_parts, toy.build_toy_model, prompts.plain_prompt, prompts.hint_prompt,
            prompts.reflection_prompt, models.FamilyAdapter.encode, models.FamilyAdapter.build_prompt, models.collate,
            decode.uniform_indices)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def manifest(out_dir: str | Path, settings: WorldSettings = WorldSettings(),
             only: tuple[str, ...] | None = None) -> Path:
    """The world's synthetic set (clips + manifest.jsonl) under out_dir; `only` some splits. Reused when present."""
    path = Path(out_dir) / "manifest.jsonl"
    stamp = Path(out_dir) / ".world-set.json"
    wanted = {"seed": settings.seed, "clips": settings.clips, "questions_per_clip": settings.questions_per_clip,
              "sft_skew": settings.sft_skew, "only": sorted(only) if only else None}
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return path
    synthetic.generate(out_dir, num=settings.clips, seed=settings.seed, questions_per_clip=settings.questions_per_clip,
                       splits=synthetic.WORLD_SPLITS, only=only, skew={"sft": settings.sft_skew})
    stamp.write_text(json.dumps(wanted))
    return path


def first_questions(manifest_path: str | Path, caps: dict[str, int], out: str | Path) -> Path:
    """A copy of a manifest with at most caps[split] questions of each split (0 or absent: all), in order."""
    taken, lines = collections.Counter(), []
    for line in Path(manifest_path).read_text().splitlines():
        split = json.loads(line)["split"]
        if not caps.get(split) or taken[split] < caps[split]:
            taken[split] += 1
            lines.append(line + "\n")
    Path(out).write_text("".join(lines))
    return Path(out)


def split_questions(settings: WorldSettings, split: str) -> list[dict]:
    """The questions of one split, drawn exactly as `synthetic.generate` draws them (no files written)."""
    rows = []
    for index, name in enumerate(synthetic.split_of(settings.clips, settings.seed, synthetic.WORLD_SPLITS)):
        if name != split:
            continue
        params, asked = synthetic.scene(settings.seed, index, settings.questions_per_clip,
                                        settings.sft_skew if split == "sft" else 0.0)
        rows += [{"clip": index, "params": params, "question": q, "answer": a} for _, q, a, _ in asked]
    return rows


def clip_frames(params: dict, frames: int) -> tuple[np.ndarray, list[int]]:
    """The frames the pipeline's frames stage keeps of a rendered clip (uniform sampling), and their indices."""
    from leanpo_core.frames import uniform_indices

    indices = uniform_indices(synthetic.NUM_FRAMES, frames)
    return synthetic.render_clip(params)[indices], indices


def cell_targets(params: dict, indices: list[int]):
    """Per merged video token (temporal step t, cell): colour, shape and motion-direction classes (0: no object, or
    not moving) of the object whose centre lies in the cell at the first frame of the step. A temporal patch holds
    two frames, so a token can see motion. Tokens are in (t, row, column) order."""
    import torch

    steps = len(indices) // 2
    colour, shape, motion = (torch.zeros(steps, GRID, dtype=torch.long) for _ in range(3))
    colours, shapes = list(synthetic.PALETTE), list(synthetic.SHAPES)
    columns = synthetic.WIDTH // synthetic.CELL
    for t in range(steps):
        frame = indices[2 * t]
        if params["kind"] == "motion":
            still = params["distractor"]
            x, y = synthetic.motion_path(params, frame)
            moving_cell = int(y // synthetic.CELL) * columns + int(x // synthetic.CELL)
            objects = [(still["shape"], still["colour"], still["cell"], 0),
                       (params["shape"], params["colour"], moving_cell,
                        synthetic.DIRECTIONS.index(params["direction"]) + 1)]
        else:
            objects = [(o["shape"], o["colour"], o["cell"], 0) for o in params["objects"]]
        for name, tint, cell, moves in objects:
            colour[t, cell], shape[t, cell] = colours.index(tint) + 1, shapes.index(name) + 1
            motion[t, cell] = moves
    return colour.flatten(), shape.flatten(), motion.flatten()


def _pretrain_vision(model, processor, adapter, settings: WorldSettings, log: Callable[[str], None]) -> dict:
    """Train the vision tower + projector so each merged token reads its cell (colour, shape, motion); freeze it."""
    import torch

    visual = model.model.visual
    items = []
    for index in range(settings.pretrain_clips):
        params = synthetic.draw_params(np.random.default_rng([settings.seed, POOL_OFFSET + index]))
        pixels, indices = clip_frames(params, settings.frames)
        inputs = processor.video_processor(videos=[pixels], return_tensors="pt", do_sample_frames=False)
        items.append((inputs["pixel_values_videos"], inputs["video_grid_thw"], *cell_targets(params, indices)))
    torch.manual_seed(settings.seed)
    classes = (len(synthetic.PALETTE) + 1, len(synthetic.SHAPES) + 1, len(synthetic.DIRECTIONS) + 1)
    head = torch.nn.Linear(model.config.text_config.hidden_size, sum(classes))
    optimizer = torch.optim.AdamW(list(visual.parameters()) + list(head.parameters()), lr=settings.pretrain_lr)
    rng, history = random.Random(settings.seed), []
    batch = 16
    for epoch in range(settings.pretrain_epochs):
        rng.shuffle(items)
        losses, hits = [], []
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            inputs = {"pixel_values_videos": torch.cat([c[0] for c in chunk]),
                      "video_grid_thw": torch.cat([c[1] for c in chunk])}
            logits = head(torch.cat(list(adapter.video_features(model, inputs).pooler_output)))
            targets = [torch.cat([c[k] for c in chunk]) for k in (2, 3, 4)]
            parts = logits.split(classes, dim=-1)
            loss = sum(torch.nn.functional.cross_entropy(p, t) for p, t in zip(parts, targets))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            right = torch.stack([p.argmax(-1) == t for p, t in zip(parts, targets)]).all(0)
            hits.append(right.float().mean().item())
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "cell_accuracy": float(np.mean(hits))})
        log(f"vision pre-training epoch {epoch + 1}/{settings.pretrain_epochs}: loss {np.mean(losses):.3f}, "
            f"cells read right {np.mean(hits):.3f}")
    visual.requires_grad_(False)
    return {"clips": settings.pretrain_clips, "epochs": history}


def _sft_items(settings: WorldSettings, rows: list[dict], processor, adapter, with_variants: bool) -> list[dict]:
    """Encoded SFT examples: each question plainly, and (with_variants) once more with the answer as a hint or in
    the self-reflection turn over a drawn previous answer, right or wrong. Answers are one word after a space, as a
    reply continues the assistant prefix."""
    rng = random.Random(settings.seed)
    options = synthetic.answer_options()
    items = []
    for row in rows:
        pixels, _ = clip_frames(row["params"], settings.frames)
        question, answer = row["question"], row["answer"]
        kind = synthetic.question_type(question)
        texts = [prompts.plain_prompt(question)]
        if with_variants:
            wrong = rng.choice([o for o in options[kind] if o != answer])
            texts.append(prompts.hint_prompt(question, answer) if rng.random() < 0.5 else
                         prompts.reflection_prompt(question, answer, " " + rng.choice([answer, wrong])))
        for text in texts:
            batch = adapter.encode(processor, pixels, adapter.build_prompt(processor, text), " " + answer)
            items.append({"inputs": batch, "kind": kind, "answer": answer, "plain": text == texts[0]})
    return items


def _accuracy(model, processor, items: list[dict]) -> dict:
    """Greedy first-token accuracy per question type on plain-prompt items (every answer is one token)."""
    import torch

    tokenizer = processor.tokenizer
    right, total = collections.Counter(), collections.Counter()
    model.eval()
    with torch.no_grad():
        for item in items:
            inputs = item["inputs"]
            prompt_len = int((inputs["labels"][0] == -100).sum())
            prompt = {k: (v[:, :prompt_len] if v.dim() == 2 and v.shape[1] == inputs["input_ids"].shape[1] else v)
                      for k, v in inputs.items() if k != "labels"}
            token = int(model(**prompt).logits[0, -1].argmax())
            right[item["kind"]] += tokenizer.decode([token]).strip() == item["answer"]
            total[item["kind"]] += 1
    model.train()
    out = {kind: {"accuracy": right[kind] / total[kind], "n": total[kind]} for kind in sorted(total)}
    out["all"] = {"accuracy": sum(right.values()) / max(1, sum(total.values())), "n": sum(total.values())}
    return out


def _sft(model, processor, adapter, settings: WorldSettings, log: Callable[[str], None]) -> dict:
    """Instruction-tune the language model (vision frozen) on the sft split; validation accuracy after each epoch."""
    import torch

    from leanpo_core.models import collate

    train = _sft_items(settings, split_questions(settings, "sft"), processor, adapter, with_variants=True)
    validation = _sft_items(settings, split_questions(settings, "validation"), processor, adapter, False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.sft_lr, weight_decay=0.0)
    steps = settings.sft_epochs * math.ceil(len(train) / settings.batch_size)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / steps))
    rng, history = random.Random(settings.seed), []
    pad = processor.tokenizer.pad_token_id
    for epoch in range(settings.sft_epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        losses = []
        for start in range(0, len(order), settings.batch_size):
            batch = collate([train[i]["inputs"] for i in order[start:start + settings.batch_size]], pad)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        accuracy = _accuracy(model, processor, validation)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "validation": accuracy})
        log(f"sft epoch {epoch + 1}/{settings.sft_epochs}: loss {np.mean(losses):.3f}, validation accuracy "
            f"{accuracy['all']['accuracy']:.3f} (n={accuracy['all']['n']}) "
            + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in accuracy.items() if k != "all"))
    return {"examples": len(train), "steps": steps, "epochs": history}


def blind_baselines(settings: WorldSettings, split: str = "validation") -> dict:
    """Accuracy on `split` of answering without the video: a uniform guess among the type's answers, the sft
    split's most common answer of the type, and the sft split's most common answer to the same question text."""
    seen = split_questions(settings, "sft")
    by_type: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_text: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in seen:
        by_type[synthetic.question_type(row["question"])][row["answer"]] += 1
        by_text[row["question"]][row["answer"]] += 1
    rows, options = split_questions(settings, split), synthetic.answer_options()
    n = len(rows)
    kinds = [synthetic.question_type(r["question"]) for r in rows]
    return {"n": n,
            "uniform": sum(1 / len(options[k]) for k in kinds) / n,
            "type_prior": sum(by_type[k].most_common(1)[0][0] == r["answer"] for k, r in zip(kinds, rows)) / n,
            "question_prior": sum((by_text[r["question"]].most_common(1) or [("", 0)])[0][0] == r["answer"]
                                  for r in rows) / n}


def build_world(out_dir: str | Path, settings: WorldSettings = WorldSettings(),
                log: Callable[[str], None] = print) -> Path:
    """Build the toy world's SFT model into out_dir (written whole, then renamed into place); reuse it when its
    world.json has the same key. Returns out_dir."""
    import torch

    from leanpo_core import models

    out = Path(out_dir)
    key = settings.key()
    if _key_of(out) == key:
        log(f"toy world {key[:12]} reused: {out}")
        return out
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    with tempfile.TemporaryDirectory(prefix=".world-", dir=out.parent if out.parent.exists() else None) as tmp:
        base = toy.build_toy_model("qwen2_vl", Path(tmp) / "base", seed=settings.seed, size="world")
        model, processor, adapter = models.load_model(base)
        log(f"toy world {key[:12]}: model built ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params)")
        vision = _pretrain_vision(model, processor, adapter, settings, log)
        sft = _sft(model, processor, adapter, settings, log)
        staging = Path(tmp) / "model"
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        shutil.copy(base / "toy.json", staging / "toy.json")
        record = {"key": key, "settings": dataclasses.asdict(settings), "splits": dict(synthetic.WORLD_SPLITS),
                  "vision_pretraining": vision, "sft": sft, "blind_baselines": blind_baselines(settings),
                  "seconds": round(time.perf_counter() - start, 1),
                  "versions": {"torch": torch.__version__.split("+")[0],
                               "transformers": __import__("transformers").__version__},
                  "command": "python -m leanpo_core.toyworld build --out DIR"}
        (staging / "world.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)
    log(f"toy world {key[:12]} built in {time.perf_counter() - start:.0f} s: {out}")
    return out


def _key_of(folder: Path) -> str | None:
    record = folder / "world.json"
    return json.loads(record.read_text()).get("key") if record.exists() else None


def ensure_world(cache_dir: str | Path, settings: WorldSettings = WorldSettings(),
                 log: Callable[[str], None] = print) -> Path:
    """The toy world's SFT model for `settings`: the shipped asset when its key matches, else the copy built under
    cache_dir/<key>, built now if missing."""
    key = settings.key()
    if _key_of(ASSET) == key:
        return ASSET
    return build_world(Path(cache_dir) / key[:16], settings, log)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m leanpo_core.toyworld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or reuse) the toy world's SFT model")
    build.add_argument("--out", required=True, type=Path, help="model folder to write (world.json inside)")
    build.add_argument("--seed", type=int, default=WorldSettings.seed, help="set and weight seed")
    sets = commands.add_parser("manifest", help="write the world's synthetic clips and manifest")
    sets.add_argument("--out", required=True, type=Path)
    sets.add_argument("--only", nargs="*", choices=[name for name, _ in synthetic.WORLD_SPLITS],
                      help="write these splits only (default: all)")
    show = commands.add_parser("show", help="print a built world's record")
    show.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "build":
        build_world(args.out, WorldSettings(seed=args.seed))
    elif args.command == "manifest":
        print(manifest(args.out, only=tuple(args.only) if args.only else None))
    else:
        print((args.folder / "world.json").read_text())


if __name__ == "__main__":
    main()
