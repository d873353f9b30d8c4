"""Sample: K winning and K losing candidates per question, each with its generation-time mean token log-prob.

docs/method.md section 5, generalised to K = `num_candidates` per side:
  win   hint turn: prompts.hint_prompt(question, answer) on the clean frames (win_temperature, win_top_p); then, with
        `reflection`, a reflection turn: prompts.reflection_prompt(question, answer, hint reply i) on the same frames,
        whose reply is y_w (candidate i's `hint_response` keeps the hint reply, `response` the reflected one);
  lose  the plain question on the lean view (augment.lean_view: one augmentation per (video, candidate, seed),
        `lose_frames` frames), lose_temperature, lose_top_p, no hint.
Per row: the response, its mean token log-prob under the prompt it was generated from (raw log-probs, see engine),
token count, finish reason, the source frame indices it saw, the augmentation (JSON), seed, model revision, config
hash. Rows follow question order, then side (win, lose), then candidate.

Reproducibility: candidate c of question q on side s has row seed = derive_seed(config.seed, q, s, c); each turn's
request seed is derive_seed(row seed, turn) and the augmentation seed derive_seed(config.seed, video_key, "augment",
c), so no seed depends on K, the shard size or which questions share a shard. With the same inputs, config and
backend, a rerun writes byte-identical shards (tested for both backends).

Shards of `shard_size` questions: all hint+lose requests of a shard go to the engine in one `generate` call, the
reflection requests in a second. A shard whose manifest exists and whose rows carry this config's hash is skipped
(resume without duplicates); a question that fails (no frames, an engine error on its requests) becomes a failures
row (stage "sample") and the shard goes on; its failures are written before its samples, whose manifest marks the
shard done.

    python -m leanpo_core.sample --config sample.yaml --root /data/run1     # tables at the run layout's paths
    python -m leanpo_core.sample --set model=/models/sft --videos /data/run1/videos.parquet \
        --frames /data/run1/frames --samples /data/run1/samples --failures /data/run1/failures/sample
    # one engine over 4 GPUs (tensor parallel): put `tensor_parallel_size: 4` in sample.yaml, or
    python -m leanpo_core.sample --config sample.yaml --root /data/run1 --set tensor_parallel_size=4
    # data parallel, one process per GPU, disjoint shards (rerun-safe):
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i python -m leanpo_core.sample --config sample.yaml --root R \
        --worker $i/4 & done; wait
"""

from __future__ import annotations

import collections
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leanpo_core import augment, frames, io, prompts, schemas, sharding, stagecli
from leanpo_core.config import SampleConfig
from leanpo_core.layout import table_arguments
from leanpo_core.engine import Completion, Engine, Request, open_engine

STAGE = "sample"


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any JSON-able parts: stable across processes and machines (unlike `hash`)."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31 - 1)


def model_revision(model: str) -> str:
    """A folder's identity: hash of config.json and the weight files' names and sizes; a hub id as given."""
    path = Path(model)
    if not path.is_dir():
        return model
    digest = hashlib.sha256()
    for item in sorted(path.iterdir()):
        if item.name == "config.json":
            digest.update(item.read_bytes())
        elif item.suffix in {".safetensors", ".bin", ".pt"}:
            digest.update(f"{item.name}:{item.stat().st_size}".encode())
    return "folder-sha256:" + digest.hexdigest()[:16]


@dataclass
class SampleResult:
    """What `run_sample` left stored for this worker's shards, and what this run itself wrote."""

    samples_uri: str
    failures_uri: str
    shards: int                                   # shards of this worker
    skipped: int                                  # already done (resume)
    rows: int = 0                                 # samples rows written by this run
    failures: int = 0                             # failure rows written by this run
    manifests: list[io.Manifest] = field(default_factory=list)          # every shard of this worker, index order
    failure_manifests: list[io.Manifest] = field(default_factory=list)  # every stored failures shard of them


def _generate(engine: Engine, requests: list[Request]) -> tuple[dict, dict[int, BaseException]]:
    """({tag: completion}, {question position: exception}): the batch in one call; if it raises, question by question
    so one bad item fails only its question. If every question fails alone too, the engine itself is broken: raise."""
    def run(batch):
        return {r.tag: c for r, (c,) in zip(batch, engine.generate(batch))}

    try:
        return run(requests), {}
    except Exception as batch_error:
        groups = collections.defaultdict(list)
        for request in requests:
            groups[request.tag[0]].append(request)
        done, failed = {}, {}
        for position, group in groups.items():
            try:
                done.update(run(group))
            except Exception as exc:
                failed[position] = exc
        if len(groups) > 1 and not done:
            raise batch_error
        return done, failed


def first_turn(engine: Engine, question: dict, row: dict[str, Any], pixels: np.ndarray, config: SampleConfig,
               pos: int = 0) -> tuple[dict, list[Request]]:
    """(prepared item, requests) of one question's first turn: K hint requests on the clean frames and K plain
    requests on lean views; tags are (pos, "hint" | "lose", candidate)."""
    k = config.num_candidates
    seeds = {(s, c): derive_seed(config.seed, question["id"], s, c) for s in ("win", "lose") for c in range(k)}
    hint = engine.adapter.build_prompt(engine.processor, prompts.hint_prompt(question["question"], question["answer"]))
    plain = engine.adapter.build_prompt(engine.processor, prompts.plain_prompt(question["question"]))
    meta, views, requests = frames.frames_metadata(row, pixels), {}, []
    for c in range(k):
        views[c] = view = augment.lean_view(pixels, row["frame_indices"], config,
                                            derive_seed(config.seed, row["video_key"], "augment", c))
        requests.append(Request(hint, pixels, meta, temperature=config.win_temperature, top_p=config.win_top_p,
                                max_tokens=config.max_new_tokens, seed=derive_seed(seeds["win", c], "hint"),
                                tag=(pos, "hint", c)))
        requests.append(Request(plain, view.frames, frames.frames_metadata(row, view.frames, view.frame_indices),
                                temperature=config.lose_temperature, top_p=config.lose_top_p,
                                max_tokens=config.max_new_tokens, seed=derive_seed(seeds["lose", c], "answer"),
                                tag=(pos, "lose", c)))
    return {"row": row, "pixels": pixels, "meta": meta, "seeds": seeds, "views": views}, requests


def sample_shard(engine: Engine, questions: list[dict], store: frames.FrameStore, config: SampleConfig,
                 revision: str) -> tuple[list[dict], list[dict]]:
    """(samples rows, failures rows) of one shard of videos-table rows."""
    k, config_hash = config.num_candidates, config.config_hash()
    keys = {q["video"]: store.key_for(q["video"]) for q in questions}
    loaded = {row["video"]: (row, pixels) for pixels, row in store.load([k for k in keys.values() if k]).values()}
    failed: dict[int, BaseException] = {}
    items: dict[int, dict] = {}
    first: list[Request] = []
    for pos, q in enumerate(questions):
        try:
            if q["video"] not in loaded:
                raise LookupError(store.missing_reason(q["video"]))
            items[pos], requests = first_turn(engine, q, *loaded[q["video"]], config, pos)
            first += requests
        except Exception as exc:
            failed[pos] = exc
    done, errors = _generate(engine, first)
    failed.update(errors)
    if config.reflection:
        second = []
        for pos, item in items.items():
            if pos in failed:
                continue
            q = questions[pos]
            for c in range(k):
                text = prompts.reflection_prompt(q["question"], q["answer"], done[pos, "hint", c].text)
                second.append(Request(engine.adapter.build_prompt(engine.processor, text), item["pixels"],
                                      item["meta"], temperature=config.win_temperature, top_p=config.win_top_p,
                                      max_tokens=config.max_new_tokens,
                                      seed=derive_seed(item["seeds"]["win", c], "reflect"), tag=(pos, "reflect", c)))
        more, errors = _generate(engine, second)
        done.update(more)
        failed.update(errors)
    rows = []
    for pos, item in items.items():
        if pos in failed:
            continue
        q, row = questions[pos], item["row"]
        for side, c in [("win", c) for c in range(k)] + [("lose", c) for c in range(k)]:
            view = item["views"][c]
            reply: Completion = done[pos, ("reflect" if config.reflection else "hint") if side == "win" else "lose", c]
            rows.append({
                "id": q["id"], "video_key": row["video_key"], "side": side, "candidate": c, "round": config.round,
                "question": q["question"], "hint_response": done[pos, "hint", c].text if side == "win" else None,
                "response": reply.text, "gen_mean_logprob": reply.mean_logprob, "gen_num_tokens": reply.num_tokens,
                "finish_reason": reply.finish_reason,
                "frame_indices": list(row["frame_indices"]) if side == "win" else view.frame_indices,
                "augmentation": json.dumps(view.params, sort_keys=True) if side == "lose" else None,
                "seed": item["seeds"][side, c], "model_revision": revision, "config_hash": config_hash})
    return rows, [sharding.exception_row(STAGE, questions[pos]["id"], questions[pos]["video"], exc)
                  for pos, exc in sorted(failed.items())]


def _shard_done(uri: str, config_hash: str, options: io.StorageOptions | None) -> bool:
    """True if the shard at `uri` is stored and complete for this config; raise if it belongs to another config."""
    if not sharding.stored(uri, options):
        return False
    hashes = set(sharding.column(uri, schemas.SAMPLES, "config_hash", options))
    if hashes and hashes != {config_hash}:
        raise ValueError(f"{uri} was written with config hash(es) {sorted(hashes)}, this run's is {config_hash}: "
                         "sample into a fresh --out (and --failures) location")
    return bool(hashes)  # an empty shard (every question failed) is redone: it may have been a transient failure


def run_sample(videos_uri: str, frames_uri: str, samples_uri: str, failures_uri: str, config: SampleConfig,
               options: io.StorageOptions | None = None, *, engine: Engine | None = None,
               worker: tuple[int, int] = (0, 1), progress: bool = True) -> SampleResult:
    """Sample every question of the videos table (this worker's shards: index % workers == worker), resuming.

    engine: reuse a started engine (its model must be config.model); by default one is opened for the run, only if
    some shard is left to do, and closed at the end. Returns the stored manifests and what this run wrote.
    """
    index, workers = worker
    if not 0 <= index < workers:
        raise ValueError(f"worker must be I/N with 0 <= I < N, got {index}/{workers}")
    questions = io.read_table(videos_uri, schemas.VIDEOS, options).to_pylist()
    duplicates = sorted(i for i, n in collections.Counter(q["id"] for q in questions).items() if n > 1)
    if duplicates:  # ids key seeds and rows: a duplicate would silently share both
        raise ValueError(f"{videos_uri}: duplicate question ids {duplicates[:10]}")
    config_hash = config.config_hash()
    shards = {i: part for i, part in sharding.plan(questions, config.shard_size).items() if i % workers == index}
    todo = [i for i in shards if not _shard_done(io.shard_uri(samples_uri, i), config_hash, options)]
    result = SampleResult(samples_uri, failures_uri, shards=len(shards), skipped=len(shards) - len(todo))
    written: dict[int, tuple[io.Manifest, io.Manifest | None]] = {}
    if todo:
        own_engine = engine is None
        store = frames.FrameStore(frames_uri, options)
        if own_engine:
            engine = open_engine(config.model, config.backend, dtype=config.dtype, seed=config.seed,
                                 max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
                                 tensor_parallel_size=config.tensor_parallel_size,
                                 max_tokens_hint=config.max_new_tokens)
        try:
            written = _sample_shards(engine, {i: shards[i] for i in todo}, store, config, samples_uri, failures_uri,
                                     options, result, progress)
        finally:
            if own_engine:
                engine.close()
    for i in shards:
        samples, failures = written.get(i) or sharding.stored_manifests(i, samples_uri, failures_uri, options)
        result.manifests.append(samples)
        if failures is not None:
            result.failure_manifests.append(failures)
    return result


def _sample_shards(engine: Engine, todo: dict[int, list[dict]], store: frames.FrameStore, config: SampleConfig,
                   samples_uri: str, failures_uri: str, options: io.StorageOptions | None, result: SampleResult,
                   progress: bool) -> dict[int, tuple[io.Manifest, io.Manifest | None]]:
    """Sample and store each shard of `todo` (sharding.write: its failures first, then its samples)."""
    from rich.console import Console
    from rich.progress import MofNCompleteColumn, Progress

    revision = config.model_revision or model_revision(config.model)
    written = {}
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), console=Console(stderr=True),
                  disable=not progress) as bar:
        task = bar.add_task(f"sample ({engine.backend})", total=sum(len(q) for q in todo.values()))
        for i, questions in todo.items():
            rows, failures = sample_shard(engine, questions, store, config, revision)
            written[i] = sharding.write(i, rows, samples_uri, schemas.SAMPLES, failures, failures_uri, options)
            result.rows += len(rows)
            result.failures += len(failures)
            bar.update(task, advance=len(questions), description=f"sample ({result.failures} failed)")
    return written


def main(argv: list[str] | None = None) -> SampleResult:
    """CLI: sample a run's questions (tables from --root, each overridable; leanpo_core/stagecli.py)."""
    tables = ("videos", "frames", "samples", "failures")
    parser = stagecli.stage_parser("sample", __doc__, tables, SampleConfig)
    parser.add_argument("--worker", default="0/1", help="I/N: do shards with index %% N == I (default 0/1)")
    args = parser.parse_args(argv)
    index, _, workers = args.worker.partition("/")
    if not (index.isdigit() and workers.isdigit() and int(index) < int(workers)):
        parser.error(f"--worker must look like I/N with I < N (e.g. 0/4), got {args.worker!r}")
    uris = table_arguments(parser, args, "sample", tables)
    config = stagecli.stage_config(args, SampleConfig, "sample")
    result = run_sample(uris["videos"], uris["frames"], uris["samples"], uris["failures"], config,
                        worker=(int(index), int(workers)), progress=stagecli.show_progress(args))
    summary = {k: v for k, v in vars(result).items() if k not in ("manifests", "failure_manifests")}
    summary["content_hashes"] = [m.content_hash for m in result.manifests]
    stagecli.report(args, [f"samples: {result.rows} rows written, {result.skipped} of {result.shards} shard(s) "
                           f"already done -> {result.samples_uri}",
                           f"failures: {result.failures} rows written -> {result.failures_uri}"], summary)
    return result


if __name__ == "__main__":
    from leanpo_core.launch import stage_entry

    stage_entry(main)
