"""Reflect (scoring): every sampled candidate gets a self-judgement, a prior-agreement F1 and an SFT likelihood.

docs/method.md section 5.5, generalised to K candidates per side. For each candidate y of question q on video V with
ground-truth answer a:
  judge   the same model rates y against a and the clean frames (prompts.judge_prompt, greedy), parsed to [0, 1];
          an unparsable reply is kept as `judge_raw` with status "unparsable" and never stops the stage;
  F1      SQuAD token F1 of y against a (no model);
  rbar    the SFT model's mean token log-prob of y given the CLEAN frames and the PLAIN question, the input the
          trainer scores with, whichever side (and view) y was sampled from; weights in fp32 or bf16
          (`ReflectConfig.scoring_precision`, `leanpo_core.scoring`), log-softmax in fp32.
  score = judge_weight * judge + prior_f1_weight * F1 + sft_logp_weight * rbar; a candidate without a parsed rating
          gets no judge term (as if rated at the bottom of the scale). Rank 0 is the best within (id, round, side).

Candidates of one question must sit in one samples shard (the sample stage shards by question); scored shards keep
the samples' shard indices, and a rerun skips every scored shard whose manifest exists and whose rows carry this
run's config hash. Candidates that cannot be scored (unknown id, missing frames) go to the failures table.

    python -m leanpo_core.reflect --root /data/run1 --model /tmp/toy-qwen2vl
    python -m leanpo_core.reflect --config reflect.yaml --root s3://bucket/run1 --model /models/sft --scored s3://b/x
"""

from __future__ import annotations

import collections
import hashlib
import re
import string
import sys

from leanpo_core import features, frames, io, models, prefix, prompts, schemas, scoring, sharding, stagecli
from leanpo_core.config import ReflectConfig
from leanpo_core.layout import table_arguments

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Decoded frames the judge pass reuses from the likelihood pass instead of reading them again (beyond it: re-read).
KEEP_FRAMES_BYTES = 2 * 2**30
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 of two texts after `normalize_answer`; two empty texts agree (1.0), one empty scores 0."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def judge_outcome(reply: str | None) -> tuple[float | None, str]:
    """(rating in [0, 1] or None, judge_status) of one judge reply."""
    score = None if reply is None else prompts.parse_rating(reply)
    return score, "ok" if score is not None else "unparsable"


def scoring_batches(processor, adapter, items: list[dict], batch_size: int, device, share_prompt: bool = False):
    """Yield (slots, collated batch on `device`): the inputs `sft_scores` scores, at most `batch_size` responses
    of equal frame shape each, right-padded; `slots[j]` is the item whose response is output sequence j (None: an
    empty place).

    Each item: frames, meta, question, response, finish_reason. The prompt is the plain question on the item's
    frames; the end-of-reply token is scored when the response ended by itself, not when it was cut at max_tokens
    (`models.ended_by_itself`, the trainer's rule too). Without `share_prompt` each item is one row and slots are
    the items in batch order. With it, the responses to one prompt on the same frames (a question's 2K candidates;
    a held-out pair's two sides) are one row `[prompt | r1 | ... | rn]` (`prefix.join_responses`: the prompt and its
    video tokens are read once), scored by `prefix.pair_logps`, whose output sequence (s - 1) * B + b is the s-th
    response of row b.
    """
    pad_id = getattr(processor, "tokenizer", processor).pad_token_id or 0  # any id: padding is masked, unscored
    order = sorted(range(len(items)), key=lambda i: (items[i]["frames"].shape, i))
    groups = [[i for i in order if items[i]["frames"].shape == shape]
              for shape in dict.fromkeys(items[i]["frames"].shape for i in order)]

    def encode(indices: list[int]) -> list[dict]:
        once = models.ProcessOnce(processor)  # consecutive responses to one prompt on one clip: pixels prepared once
        out = []
        for i in indices:
            it = items[i]
            prompt = adapter.build_prompt(processor, prompts.plain_prompt(it["question"]))
            out.append(adapter.encode(once, it["frames"], prompt, it["response"], meta=it["meta"],
                                      add_end=models.ended_by_itself(it["finish_reason"])))
        return out

    for group in groups:
        if not share_prompt:
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                yield chunk, {k: v.to(device) for k, v in models.collate(encode(chunk), pad_id).items()}
            continue
        same = collections.defaultdict(list)  # one prompt on one clip: question and frames (video id or object)
        for i in group:
            same[(items[i]["question"], video_id(items[i]) or id(items[i]["frames"]))].append(i)
        units = [ids[s:s + batch_size] for ids in same.values() for s in range(0, len(ids), batch_size)]
        batch_units, count = [], 0
        for unit in [*units, None]:
            if batch_units and (unit is None or count + len(unit) > batch_size):
                width = max(len(u) for u in batch_units)
                slots = [u[s] if s < len(u) else None for s in range(width) for u in batch_units]
                rows = [prefix.join_responses(encode(u)) for u in batch_units]
                yield slots, {k: v.to(device) for k, v in prefix.collate_rows(rows, pad_id).items()}
                batch_units, count = [], 0
            if unit is not None:
                batch_units.append(unit)
                count += len(unit)


def video_id(item: dict) -> str | None:
    """What identifies an item's frames for the feature cache: its video key and frame indices (None: unknown)."""
    key, indices = item.get("video_key"), (item.get("meta") or {}).get("frames_indices")
    return None if key is None or indices is None else f"{key}@{','.join(map(str, indices))}"


def sft_scores(model, processor, adapter, items: list[dict], batch_size: int,
               cache: features.FeatureCache | None = None, share_prompt: bool = False) -> list[tuple[float, int]]:
    """(mean token log-prob, tokens scored) of each item's response under `model`, in `items` order.

    Inputs as `scoring_batches` makes them. The model may hold bf16 weights (`scoring.load_scoring_model`): the
    log-softmax and the per-response sums run in fp32 either way (`logps.token_logps`), so rbar is an fp32 number
    computed from bf16 logits. With a `cache` (one per loaded model: it is keyed by the model object), the vision
    tower runs once per video (`video_id`) across all calls, the features of a video seen before are reused.
    `share_prompt`: the responses to one prompt on one clip share a row (`scoring_batches`), where the model's
    attention takes a 4-D mask (`prefix.unsupported_reason`); the same values up to float summation order.
    """
    import torch

    from leanpo_core import logps

    share_prompt = share_prompt and prefix.unsupported_reason(model) is None
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = [(float("nan"), 0)] * len(items)
    with torch.no_grad():
        for slots, batch in scoring_batches(processor, adapter, items, batch_size, device, share_prompt):
            joined = prefix.LENGTHS in batch
            rows = slots[:batch[prefix.LENGTHS].shape[0]] if joined else slots  # an item of each row (its video)
            ids = [video_id(items[i]) for i in rows]
            cached = features.cached_video_features(adapter, model, batch, ids, cache) \
                if cache is not None and all(ids) else None
            if joined:
                sums, counts = prefix.pair_logps(model, adapter, batch, features=cached)
            elif cached is not None:
                hidden = adapter.shared_video_hidden_states(model, batch, copies=1, features=cached)
                sums, counts = logps.response_logps(hidden, batch["labels"], models.output_projection(model))
            else:
                sums, counts = logps.model_response_logps(model, batch)
            for i, total, count in zip(slots, sums.float().tolist(), counts.tolist()):
                if i is not None:
                    out[i] = (total / count if count else float("nan"), int(count))
    return out


def judge_scores(engine, items: list[dict], config: ReflectConfig) -> list[tuple]:
    """(rating or None, raw reply or None, judge_status) of each item, from one batched greedy engine call."""
    from leanpo_core.engine import Request

    adapter, processor = engine.adapter, engine.processor
    requests = [Request(prompt=adapter.build_prompt(processor, prompts.judge_prompt(it["question"], it["answer"],
                                                                                    it["response"])),
                        frames=it["frames"], meta=it["meta"], n=1, temperature=0.0, top_p=1.0,
                        max_tokens=config.judge_max_tokens, seed=0) for it in items]
    results = engine.generate(requests) if requests else []
    out = []
    for completions in results:
        raw = completions[0].text if completions else None
        rating, status = judge_outcome(raw)
        out.append((rating, raw, status))
    return out


def combine(config: ReflectConfig, judge: float | None, f1: float, sft_logp: float) -> float:
    """The ranking score; a missing rating (judge off or unparsable) contributes nothing."""
    score = config.prior_f1_weight * f1 + config.sft_logp_weight * sft_logp
    return score + config.judge_weight * judge if judge is not None else score


def assign_ranks(rows: list[dict]) -> None:
    """Set `rank` in place: 0 = highest score within (id, round, side); ties go to the lower candidate index."""
    groups = collections.defaultdict(list)
    for row in rows:
        groups[(row["id"], row["round"], row["side"])].append(row)
    for group in groups.values():
        for rank, row in enumerate(sorted(group, key=lambda r: (-r["score"], r["candidate"]))):
            row["rank"] = rank


def stage_hash(config: ReflectConfig, sample_model: str) -> str:
    """The config hash scored rows carry: the config plus the judge model (the sampling model), which it omits,
    and the precision `scoring_precision` resolves to here (auto is fp32 on CPU, bf16 on a bf16 GPU: a run resumed
    on another kind of machine rescores its shards rather than mixing the two)."""
    precision = scoring.precision_label(config.scoring_precision, config.device)
    return hashlib.sha256(f"{config.config_hash()}:{sample_model}:{precision}".encode()).hexdigest()[:16]


def _shard_done(uri: str, run_hash: str, options: io.StorageOptions | None) -> bool:
    """A scored shard is done when it is stored (`sharding.stored`) and its rows carry `run_hash`."""
    if not sharding.stored(uri, options):
        return False
    return set(sharding.column(uri, schemas.SCORED, "config_hash", options)) <= {run_hash}


def _failure(row: dict, video: str | None, exc: BaseException) -> dict:
    return sharding.exception_row("reflect", row["id"], video, exc,
                                  f"{row['side']} candidate {row['candidate']}: {exc}")


def prepare_shard(samples: list[dict], videos: dict[str, dict], store: frames.FrameStore) -> tuple[list[dict], list[dict]]:
    """(items to score: sample rows plus answer, clean frames and metadata; failure rows) of one samples shard."""
    loaded = store.load(sorted({row["video_key"] for row in samples}))
    items, failures = [], []
    for row in samples:
        video = videos.get(row["id"])
        if video is None:
            failures.append(_failure(row, None, KeyError(f"id {row['id']!r} is not in the videos table")))
        elif row["video_key"] not in loaded:
            failures.append(_failure(row, video["video"],
                                     KeyError(f"video_key {row['video_key']!r} is not in the frames table")))
        else:
            clip, frames_row = loaded[row["video_key"]]
            meta = frames.frames_metadata(frames_row, clip)
            items.append({**row, "answer": video["answer"], "video": video["video"], "frames": clip, "meta": meta})
    return items, failures


def scored_rows(items: list[dict], sft: list[tuple], judged: list[tuple], config: ReflectConfig,
                run_hash: str) -> tuple[list[dict], list[dict]]:
    """(ranked SCORED rows sorted by (id, round, side, candidate), failure rows) from the per-item scores."""
    rows, failures = [], []
    for it, (mean, count), (rating, raw, status) in zip(items, sft, judged, strict=True):
        if count == 0:  # an empty reply cut at max_tokens: no token to average over, so no reward to rank by
            failures.append(_failure(it, it["video"], ValueError("no response tokens to score")))
            continue
        f1 = token_f1(it["response"], it["answer"])
        rows.append({
            **{k: it[k] for k in ("id", "video_key", "side", "candidate", "round", "response", "finish_reason",
                                  "gen_mean_logprob", "model_revision")},
            "judge_score": rating, "judge_raw": raw, "judge_status": status, "prior_f1": f1,
            "sft_mean_logprob": mean, "sft_num_tokens": count, "score": combine(config, rating, f1, mean),
            "config_hash": run_hash,
        })
    assign_ranks(rows)
    rows.sort(key=lambda r: (r["id"], r["round"], r["side"], r["candidate"]))
    return rows, failures


def load_scorer(config: ReflectConfig, sample_model: str):
    """(model, processor, adapter) of the SFT model, in eval mode, on `config.device` with the weights of
    `config.scoring_precision` (`scoring.load_scoring_model`)."""
    return scoring.load_scoring_model(config.sft_model or sample_model, config.scoring_precision, config.device)


def free_memory() -> None:
    """Return a dropped model's memory (and its accelerator memory) before another model loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_reflect(videos_uri: str, frames_uri: str, samples_uri: str, scored_uri: str, failures_uri: str,
                config: ReflectConfig, sample_model: str, options: io.StorageOptions | None = None, *,
                shards: list[int] | None = None, progress: bool = False) -> list[io.Manifest]:
    """Score every candidate of the samples dataset into the scored dataset, shard by shard; one manifest per shard.

    sample_model: the model that generated the samples; it judges them, and scores likelihood unless
    `config.sft_model` names another. Shards already scored under the same config hash are skipped, and their
    stored manifests returned as they are. `shards` limits the run to those samples shard indices (a Dask cluster
    runs one scoring task per shard: tasks/data.py); disjoint subsets can run at the same time.
    """
    from rich.progress import Progress

    run_hash = stage_hash(config, sample_model)
    found = io.shard_uris(samples_uri, options)
    if not found:
        raise FileNotFoundError(f"no samples shards ({io.SHARD_PREFIX}*.parquet) under {samples_uri}")
    unknown = sorted(set(shards or ()) - set(found))
    if unknown:
        raise ValueError(f"samples shard(s) {unknown} do not exist under {samples_uri}")
    shards = found if shards is None else {i: found[i] for i in sorted(set(shards))}
    pending = {i: uri for i, uri in shards.items()
               if not _shard_done(io.shard_uri(scored_uri, i), run_hash, options)}
    manifests = {i: io.read_manifest(io.shard_uri(scored_uri, i), options) for i in shards if i not in pending}
    if not pending:
        return [manifests[i] for i in sorted(manifests)]
    videos = {row["id"]: row for row in io.read_table(videos_uri, schemas.VIDEOS, options)
              .select(["id", "video", "answer"]).to_pylist()}
    store = frames.FrameStore(frames_uri, options)

    def prepare(i: int) -> tuple[list[dict], list[dict]]:
        return prepare_shard(io.read_table(pending[i], schemas.SAMPLES, options).to_pylist(), videos, store)

    def write(i: int, items: list[dict], failures: list[dict], sft: list[tuple], judged: list[tuple]) -> None:
        rows, unscored = scored_rows(items, sft, judged, config, run_hash)
        failures = failures + unscored
        manifests[i] = sharding.write(i, rows, scored_uri, schemas.SCORED, failures, failures_uri, options)[0]

    # Two passes when judging: the SFT model scores every pending shard and leaves the device before the judge
    # engine starts, so the two never hold accelerator memory together (and, on CPU, HF runs before vLLM pins the
    # process's OpenMP threads). Shards are written as they are judged; a crash loses only unwritten shards. The
    # judge pass reuses the frames the first pass read while they fit KEEP_FRAMES_BYTES; later shards are read again.
    sft_by_shard, kept, kept_bytes = {}, {}, 0
    with Progress(disable=not progress) as bar:
        task = bar.add_task("reflect: scoring shards", total=len(pending) * (2 if config.judge else 1))
        model, processor, adapter = load_scorer(config, sample_model)
        cache = features.new_cache(config.vision_feature_cache_mib, config.persist_vision_features, frames_uri,
                                   options)
        for i in pending:
            items, failures = prepare(i)
            sft = sft_scores(model, processor, adapter, items, config.batch_size, cache, config.prefix_sharing)
            if config.judge:
                sft_by_shard[i] = sft
                size = sum({id(it["frames"]): it["frames"].nbytes for it in items}.values())
                if kept_bytes + size <= KEEP_FRAMES_BYTES:
                    kept[i], kept_bytes = (items, failures), kept_bytes + size
            else:
                write(i, items, failures, sft, [(None, None, "off")] * len(items))
            bar.advance(task)
        if cache is not None:
            print(f"reflect: {cache.summary()}", file=sys.stderr, flush=True)
        del model
        free_memory()
        if config.judge:
            from leanpo_core.engine import open_engine

            engine = open_engine(sample_model, backend=config.backend, max_tokens_hint=config.judge_max_tokens)
            try:
                for i, sft in sft_by_shard.items():
                    items, failures = kept.pop(i, None) or prepare(i)
                    write(i, items, failures, sft, judge_scores(engine, items, config))
                    bar.advance(task)
            finally:
                engine.close()
    return [manifests[i] for i in sorted(manifests)]


def main(argv: list[str] | None = None) -> list[io.Manifest]:
    """CLI: score a run's samples (tables from --root, each overridable; leanpo_core/stagecli.py)."""
    tables = ("videos", "frames", "samples", "scored", "failures")
    parser = stagecli.stage_parser("reflect", __doc__, tables, ReflectConfig)
    parser.add_argument("--model", required=True, help="the sampling model (judges; scores unless sft_model is set)")
    parser.add_argument("--shards", help="comma-separated samples shard indices to score (default: all)")
    args = parser.parse_args(argv)
    uris = table_arguments(parser, args, "reflect", tables)
    config = stagecli.stage_config(args, ReflectConfig, "reflect")
    manifests = run_reflect(uris["videos"], uris["frames"], uris["samples"], uris["scored"], uris["failures"],
                            config, args.model, progress=stagecli.show_progress(args),
                            shards=[int(s) for s in args.shards.split(",")] if args.shards else None)
    rows = sum(m.rows for m in manifests)
    stagecli.report(args, [f"scored: {rows} candidates in {len(manifests)} shard(s) -> {uris['scored']}"],
                    {"scored": {"uri": uris["scored"], "rows": rows, "shards": [m.to_dict() for m in manifests]}})
    return manifests


if __name__ == "__main__":
    from leanpo_core.launch import stage_entry

    stage_entry(main)
