"""The Parquet contract: one declared schema and version per table the pipeline writes.

Every writer and reader goes through `conform` (rows or a table in, a schema-exact table out) and
`check_version` (a table read back must carry the version this code understands). Pair columns follow TRL's
preference-data names (`prompt`, `chosen`, `rejected`) so other trainers can read the pairs table as it is.

Frames are stored once, by the frames stage, as raw RGB bytes: `frames` holds a C-ordered uint8 array of shape
`frames_shape` = (T, H, W, 3), zstd-compressed by Parquet where that pays (`io.write_table`). Raw pixels are
lossless and decode with one `numpy.frombuffer`, so no later stage ever decodes video again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import pyarrow as pa

from leanpo_core.launch import BadInput

TABLE_KEY = b"leanpo.table"
VERSION_KEY = b"leanpo.schema_version"


class SchemaMismatch(BadInput):
    """A table does not match its declared schema (missing, extra or mistyped column, or another version)."""


@dataclass(frozen=True)
class TableSpec:
    """One table of the pipeline: its name, schema version and Arrow schema."""

    name: str
    version: int
    schema: pa.Schema

    @property
    def columns(self) -> list[str]:
        return self.schema.names


def _spec(name: str, version: int, *fields: pa.Field) -> TableSpec:
    return TableSpec(name, version, pa.schema(list(fields)))


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


_STR, _F64, _I32, _I64 = pa.string(), pa.float64(), pa.int32(), pa.int64()
_TS = pa.timestamp("us", tz="UTC")

VIDEOS = _spec(
    "videos", 1,
    _f("id", _STR), _f("video", _STR), _f("question", _STR),
    _f("answer", _STR),                       # the ground truth: the "prior knowledge" hint
    _f("split", _STR, True), _f("source", _STR, True),
    _f("chosen", _STR, True), _f("rejected", _STR, True),  # LLaVA-Hound's own pair, used only by the DPO baseline
)

FRAMES = _spec(
    "frames", 1,
    _f("video_key", _STR),                    # content key of (video, sampling config)
    _f("video", _STR), _f("decoder", _STR),   # decord | pyav | folder
    _f("sampling", _STR),                     # e.g. "uniform:16" or "fps:1.0:max32"
    _f("frame_indices", pa.list_(_I32)), _f("timestamps", pa.list_(_F64)),
    _f("fps", _F64), _f("duration", _F64), _f("num_frames_total", _I64),
    _f("width", _I32), _f("height", _I32),    # of the source video
    _f("frames_shape", pa.list_(_I32)),       # (T, H, W, 3) of the stored frames
    _f("frames", pa.large_binary()),
    _f("config_hash", _STR),
)

SAMPLES = _spec(
    "samples", 1,
    _f("id", _STR), _f("video_key", _STR),
    _f("side", _STR),                         # "win" (hint + self-reflection) | "lose" (lean augmented view)
    _f("candidate", _I32), _f("round", _I32),
    _f("question", _STR),
    _f("hint_response", _STR, True),          # first-turn reply of the winning side, before reflection
    _f("response", _STR),
    _f("gen_mean_logprob", _F64), _f("gen_num_tokens", _I32), _f("finish_reason", _STR),
    _f("frame_indices", pa.list_(_I32)),      # the frames this response saw
    _f("augmentation", _STR, True),           # JSON of the drawn augmentation parameters (losing side)
    _f("seed", _I64), _f("model_revision", _STR), _f("config_hash", _STR),
)

SCORED = _spec(
    "scored", 2,
    _f("id", _STR), _f("video_key", _STR), _f("side", _STR), _f("candidate", _I32), _f("round", _I32),
    _f("response", _STR),
    _f("finish_reason", _STR),                # the sample's: "length" (cut at max_tokens) is scored without end token
    _f("judge_score", _F64, True), _f("judge_raw", _STR, True),
    _f("judge_status", _STR),                 # ok | unparsable | off
    _f("prior_f1", _F64),
    _f("sft_mean_logprob", _F64), _f("sft_num_tokens", _I32),
    _f("gen_mean_logprob", _F64),
    _f("score", _F64), _f("rank", _I32),
    _f("model_revision", _STR), _f("config_hash", _STR),
)

PAIRS = _spec(
    "pairs", 2,
    _f("pair_id", _STR), _f("id", _STR),
    _f("prompt", _STR), _f("chosen", _STR), _f("rejected", _STR),  # TRL's preference columns
    _f("video", _STR), _f("video_key", _STR), _f("frames_uri", _STR),
    _f("chosen_frame_indices", pa.list_(_I32)), _f("rejected_frame_indices", pa.list_(_I32)),
    _f("chosen_score", _F64, True), _f("rejected_score", _F64, True),
    _f("chosen_gen_logp", _F64), _f("rejected_gen_logp", _F64),    # generation-time mean token log-probs
    _f("chosen_sft_logp", _F64, True), _f("rejected_sft_logp", _F64, True),
    # "stop" | "length" (cut at max_tokens: scored and trained without the end-of-reply token); null = ended by itself
    _f("chosen_finish_reason", _STR, True), _f("rejected_finish_reason", _STR, True),
    _f("kept", pa.bool_()), _f("drop_reason", _STR, True),
    _f("model_revision", _STR), _f("round", _I32), _f("config_hash", _STR),
)

FAILURES = _spec(
    "failures", 1,
    _f("stage", _STR), _f("id", _STR, True), _f("video", _STR, True),
    _f("error_type", _STR), _f("message", _STR), _f("traceback", _STR, True),
    _f("attempt", _I32), _f("created_at", _TS),
)

TRAIN_METRICS = _spec(
    "train_metrics", 1,
    _f("run_id", _STR), _f("step", _I64), _f("epoch", _F64),
    *[_f(name, _F64, True) for name in (
        "loss", "loss/pair", "loss/sft", "learning_rate", "grad_norm",
        "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected", "label_smoothing/active_fraction",
        "displacement/chosen", "displacement/rejected",
    )],
)

EVALUATION = _spec(
    "evaluation", 2,
    _f("run_id", _STR), _f("model", _STR), _f("split", _STR), _f("metric", _STR),
    _f("value", _F64), _f("n", _I64),
    _f("ci_low", _F64, True), _f("ci_high", _F64, True),  # 95% interval (v2): Wilson, or paired bootstrap for changes
    _f("details", _STR, True),
)

ANSWERS = _spec(  # one row per model and held-out question: what the evaluation's answer metrics are made of
    "answers", 1,
    _f("run_id", _STR), _f("model", _STR), _f("split", _STR), _f("id", _STR),
    _f("category", _STR), _f("question", _STR), _f("answer", _STR), _f("response", _STR),
    _f("correct", pa.bool_(), True),  # exact-answer items (synthetic); null where token F1 scores the answer
    _f("f1", _F64), _f("answer_logp", _F64, True),
)

BENCHMARK_ANSWERS = _spec(  # one row per model and standard-benchmark question (leanpo_core/benchmarks.py)
    "benchmark_answers", 1,
    _f("run_id", _STR), _f("model", _STR), _f("benchmark", _STR), _f("id", _STR), _f("video", _STR),
    _f("categories", _STR),                   # JSON {axis: value}, e.g. {"duration": "short", "domain": ...}
    _f("prompt", _STR), _f("answer", _STR),   # the question as asked; the right option's letter
    _f("response", _STR),
    _f("extracted", _STR, True),              # the letter read from the response; null: malformed (counted wrong)
    _f("correct", pa.bool_()),
    _f("frames", _I32), _f("prompt_tokens", _I32), _f("reply_tokens", _I32),  # what the question cost
)

REGISTRY = _spec(  # the model registry's append-only log (leanpo_core/registry.py): one row per event
    "registry", 1,
    _f("event_id", _STR),
    _f("event", _STR),                        # registered | evaluated | promoted | rejected | rolled_back
    _f("created_at", _TS), _f("created_by", _STR),  # when, and who (user@host, or what: a flow run)
    _f("reason", _STR, True),                 # why (required for promoted, rejected, rolled_back)
    _f("model_id", _STR),                     # the model the event is about (rolled_back: the model restored)
    _f("alias", _STR, True),                  # the deployment alias (promoted, rolled_back; rejected: optional)
    _f("previous_model_id", _STR, True),      # the alias's current model before the event
    # lineage, on "registered" rows
    _f("model_uri", _STR, True), _f("base_model", _STR, True), _f("objective", _STR, True), _f("run_id", _STR, True),
    _f("pairs_uri", _STR, True), _f("pairs_hash", _STR, True),  # the pairs table and its content hash (sha256)
    _f("config_hash", _STR, True), _f("round", _I32, True),
    _f("steps", _I64, True), _f("final_loss", _F64, True), _f("metrics_uri", _STR, True),  # training summary
    # registered and evaluated rows: JSON {metric: {value, n, ci_low, ci_high, split}} and the table it came from
    _f("evaluation", _STR, True), _f("evaluation_uri", _STR, True),
    _f("details", _STR, True),                # a small JSON object (e.g. the folder a registered model was copied from)
)

TABLES: dict[str, TableSpec] = {
    spec.name: spec for spec in (VIDEOS, FRAMES, SAMPLES, SCORED, PAIRS, FAILURES, TRAIN_METRICS, EVALUATION,
                                 ANSWERS, BENCHMARK_ANSWERS, REGISTRY)
}


def conform(data: pa.Table | Iterable[Mapping], spec: TableSpec) -> pa.Table:
    """Return `data` as a table with exactly `spec`'s columns, order, types and version metadata.

    Accepts a pyarrow table or an iterable of row dicts. Raises SchemaMismatch naming the offending column.
    """
    if not isinstance(data, pa.Table):
        rows = list(data)
        # Every row is checked, not just the first: from_pylist silently drops unknown keys and turns a key missing
        # from a later row into a null.
        extra = sorted(set().union(*rows) - set(spec.columns)) if rows else []
        missing = [f.name for f in spec.schema if not f.nullable and any(f.name not in row for row in rows)]
        if missing or extra:
            raise SchemaMismatch(
                f"table {spec.name!r}: rows lack required column(s) {missing}, have unexpected column(s) {extra}"
            )
        arrays = []
        for field in spec.schema:  # column by column, so a conversion error can name its column
            try:
                arrays.append(pa.array([row.get(field.name) for row in rows], type=field.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
                raise SchemaMismatch(f"table {spec.name!r}: column {field.name!r}: {exc}") from exc
        data = pa.Table.from_arrays(arrays, schema=spec.schema)
    extra = [c for c in data.column_names if c not in spec.columns]
    missing = [c for c in spec.columns if c not in data.column_names]
    if extra or missing:
        raise SchemaMismatch(f"table {spec.name!r}: missing columns {missing}, unexpected columns {extra}")
    columns = []
    for field in spec.schema:
        column = data.column(field.name)
        if not column.type.equals(field.type):
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaMismatch(
                    f"table {spec.name!r}: column {field.name!r} is {column.type}, expected {field.type}"
                ) from exc
        if not field.nullable and column.null_count:
            raise SchemaMismatch(f"table {spec.name!r}: column {field.name!r} has {column.null_count} null(s)")
        columns.append(column)
    metadata = {TABLE_KEY: spec.name.encode(), VERSION_KEY: str(spec.version).encode()}
    return pa.Table.from_arrays(columns, schema=spec.schema.with_metadata(metadata))


def check_version(table: pa.Table, spec: TableSpec) -> pa.Table:
    """Raise SchemaMismatch unless `table` was written as `spec`'s table at `spec`'s version."""
    meta = table.schema.metadata or {}
    name, version = meta.get(TABLE_KEY, b"").decode(), meta.get(VERSION_KEY, b"").decode()
    if name != spec.name or version != str(spec.version):
        raise SchemaMismatch(
            f"expected table {spec.name!r} v{spec.version}, found {name or '?'!r} v{version or '?'}"
        )
    return conform(table, spec)
