"""Videos: a video-QA manifest becomes the validated `videos` table, the pipeline's input.

Reads CSV, JSONL or Parquet manifests with columns id, video, question, answer (the ground truth, the prior
knowledge of docs/method.md section 5.1) and optional split, source, from a local path or s3://. Also reads
LLaVA-Hound's `sft_dpo_17k.jsonl` unchanged: fields id, video (a folder of extracted frames, resolved against
`video_root`), prompt (-> question, its `<video>` placeholder removed: the model adapter places the video itself),
answer, chosen, rejected.

Every problem is reported at once, each naming its row and column: missing columns, wrong types, duplicate ids,
empty question or answer, text that is not UTF-8, chat-control tokens in text (`<|im_end|>`, `<video>`, ...: see
`prompts.CONTROL_TOKEN`), `..` in a video path, and paths or URIs outside the allowed roots (the manifest's folder
or `video_root`, plus `roots`; a local path counts where it really leads, so a symlink out of a root is outside).
Relative video paths resolve against `video_root` when given, else against the manifest's folder.

    python -m leanpo_core.videos data/qa.jsonl --root runs/r1                       # -> runs/r1/videos.parquet
    python -m leanpo_core.videos sft_dpo_17k.jsonl --video-root /data/hound/frames \
        --videos s3://bucket/r1/videos.parquet
    python -m leanpo_core.videos qa.jsonl --root runs/r1 --allowed-root /data/videos --allowed-root s3://bucket/clips
"""

from __future__ import annotations

import argparse
import csv
import io as pyio
import json
import os
import posixpath
from typing import Any

from leanpo_core import io, schemas
from leanpo_core.launch import BadInput
from leanpo_core.prompts import CONTROL_TOKEN

REQUIRED = ("id", "video", "question", "answer")
OPTIONAL = ("split", "source", "chosen", "rejected")
_HOUND = ("id", "video", "prompt", "answer")  # LLaVA-Hound's DPO jsonl; chosen/rejected optional
_MAX_LISTED = 20
# Tokenizers turn chat-control strings into special tokens even inside user text, so a question holding one could
# close the user turn, open a fake system turn or add a second video slot.
_TEXT_COLUMNS = ("question", "answer", "chosen", "rejected")


class ManifestError(BadInput):
    """The manifest is invalid; the message lists every problem with its row and column."""


def _fmt(uri: str) -> str:
    name = uri.lower().rstrip("/")
    for suffix, kind in ((".csv", "csv"), (".jsonl", "jsonl"), (".json", "jsonl"), (".parquet", "parquet")):
        if name.endswith(suffix):
            return kind
    raise ManifestError(f"{uri}: unknown manifest format; use .csv, .jsonl or .parquet")


def _decode_lines(data: bytes, errors: list[str]) -> list[str]:
    """Lines of `data`, each decoded alone so a bad byte is reported with its line number."""
    lines = []
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):  # csv needs the line ends
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            errors.append(f"line {number}: not UTF-8 text (byte {exc.start})")
            lines.append("")
    return lines


def _read_records(uri: str, options: io.StorageOptions | None,
                  errors: list[str]) -> tuple[list[dict], list[str], list[int] | None]:
    """(records, column names, each record's line or None) of the manifest; parse errors go to `errors`."""
    try:
        data = io.read_bytes(uri, options)
    except FileNotFoundError:
        raise ManifestError(f"{uri}: no such manifest") from None
    kind = _fmt(uri)
    if kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(pyio.BytesIO(data))
        return table.to_pylist(), table.column_names, None  # types are checked per cell, so errors name the row
    lines = _decode_lines(data.removeprefix(b"\xef\xbb\xbf"), errors)
    if kind == "csv":
        reader = csv.DictReader(lines)
        records = [dict(row) for row in reader]
        return records, list(reader.fieldnames or []), None
    records, columns, line_of = [], {}, []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"line {number}: invalid JSON ({exc.msg})")
            continue
        if not isinstance(record, dict):
            errors.append(f"line {number}: expected a JSON object, found {type(record).__name__}")
            continue
        records.append(record)
        line_of.append(number)
        columns.update(dict.fromkeys(record))
    return records, list(columns), line_of


def _text(value: Any, row: str, column: str, errors: list[str], required: bool) -> str | None:
    if value is None or (value == "" and not required):
        if required:
            errors.append(f"{row}, column {column!r}: missing value")
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            errors.append(f"{row}, column {column!r}: not UTF-8 text")
            return None
    if column == "id" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # JSON ids are often numbers
    if not isinstance(value, str):
        errors.append(f"{row}, column {column!r}: expected a string, found {type(value).__name__}")
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\udc80" escape
        errors.append(f"{row}, column {column!r}: not UTF-8 text")
        return None
    if required and not value.strip():
        errors.append(f"{row}, column {column!r}: empty")
        return None
    return value


def _is_uri(path: str) -> bool:
    return "://" in path


def _under(path: str, root: str) -> bool:
    if _is_uri(path) != _is_uri(root):
        return False
    if _is_uri(root):
        return path.startswith(root.rstrip("/") + "/")
    root = os.path.normpath(root)
    return os.path.commonpath([os.path.normpath(path), root]) == root


def _real(path: str) -> str:
    return path if _is_uri(path) else os.path.realpath(path)


def resolve_video(video: str, base: str, roots: list[str]) -> str:
    """The absolute path or URI of `video`; ValueError for `..`, unsupported schemes or paths outside `roots`.

    Local paths are checked where they really lead (symlinks followed, in the path and in the roots): a link
    inside a root that points out of it is outside.
    """
    scheme = video.partition("://")[0].lower() if _is_uri(video) else ""
    if scheme and scheme not in ("s3", "s3a"):
        raise ValueError(f"unsupported scheme {scheme!r}: use a local path or s3://")
    if ".." in video.replace("\\", "/").split("/"):
        raise ValueError(f"path traversal ('..') in {video!r}")
    if scheme:
        resolved = video
    elif os.path.isabs(video):
        resolved = os.path.normpath(video)
    elif _is_uri(base):
        return posixpath.join(base.rstrip("/"), video)
    else:
        resolved = os.path.normpath(os.path.join(base, video))
    real = _real(resolved)
    if not any(_under(real, _real(root)) for root in roots):
        leads = "" if real == resolved else f" (which resolves to {real!r})"
        raise ValueError(f"{video!r}{leads} is outside the allowed roots {roots}")
    return resolved


def _report(uri: str, errors: list[str]) -> str:
    listed = errors[:_MAX_LISTED] + ([f"... and {len(errors) - _MAX_LISTED} more"] if len(errors) > _MAX_LISTED else [])
    return f"{uri}: {len(errors)} problem(s):\n  " + "\n  ".join(listed)


def read_videos(uri: str, video_root: str | None = None, roots: list[str] | None = None,
                options: io.StorageOptions | None = None) -> list[dict]:
    """Rows of the videos table from the manifest at `uri`; ManifestError lists every problem found.

    `video_root`: where relative video paths (and Hound's frame-folder names) live; default the manifest's folder.
    `roots`: further folders or s3:// prefixes that absolute paths and URIs may point into.
    """
    errors: list[str] = []
    records, columns, line_of = _read_records(uri, options, errors)
    hound = "question" not in columns and "prompt" in columns
    needed = _HOUND if hound else REQUIRED
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ManifestError(_report(uri, [f"missing column(s) {missing}; found {columns}", *errors]))
    base = video_root or (posixpath.dirname(uri) if _is_uri(uri) else os.path.dirname(uri))
    allowed = [r if _is_uri(r) else os.path.abspath(r) for r in (base, *(roots or []))]
    base = allowed[0]
    rows: list[dict] = []
    first_row_of: dict[str, int] = {}
    for number, record in enumerate(records, start=1):
        # JSONL skips blank and broken lines, so a row's number and its line can differ: name both then.
        line = line_of[number - 1] if line_of else number
        where = f"row {number}" if line == number else f"row {number} (line {line})"
        row = {c: _text(record.get(c), where, c, errors, required=True) for c in needed}
        row.update({c: _text(record.get(c), where, c, errors, required=False) for c in OPTIONAL})
        if hound:
            row["question"] = row.pop("prompt")
            if row["question"] is not None:
                row["question"] = row["question"].replace("<video>\n", "").replace("<video>", "").strip()
                if not row["question"]:
                    errors.append(f"{where}, column 'prompt': empty once its <video> placeholder is removed")
            row["source"] = row["source"] or "llava_hound"
        for column in _TEXT_COLUMNS:
            if row[column] is not None and (found := CONTROL_TOKEN.search(row[column])):
                name = "prompt" if hound and column == "question" else column
                errors.append(f"{where}, column {name!r}: contains the chat control token {found.group()!r}, "
                              "which the model's tokenizer would read as a special token")
        if row["id"] is not None:
            if row["id"] in first_row_of:
                errors.append(f"{where}, column 'id': duplicate id {row['id']!r} (first in row "
                              f"{first_row_of[row['id']]})")
            first_row_of.setdefault(row["id"], number)
        if row["video"] is not None:
            try:
                row["video"] = resolve_video(row["video"], base, allowed)
            except ValueError as exc:
                errors.append(f"{where}, column 'video': {exc}")
        rows.append(row)
    if not records and not errors:
        errors.append("no rows")
    if errors:
        raise ManifestError(_report(uri, errors))
    return rows


def write_videos(rows: list[dict], uri: str, options: io.StorageOptions | None = None) -> io.Manifest:
    """Store `rows` as the videos table at `uri` (atomic, with its manifest)."""
    return io.write_table(rows, uri, schemas.VIDEOS, options)


def main(argv: list[str] | None = None) -> io.Manifest:
    """CLI: validate a manifest into a run's videos table (--root, or --videos for the table's own location)."""
    from leanpo_core import stagecli
    from leanpo_core.layout import add_table_arguments, table_arguments

    parser = argparse.ArgumentParser(prog="python -m leanpo_core.videos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", help="CSV, JSONL or Parquet manifest (local path or s3://)")
    add_table_arguments(parser, "videos", ("videos",))
    parser.add_argument("--video-root", help="folder relative video paths resolve against (default: the manifest's)")
    parser.add_argument("--allowed-root", action="append", default=[], help="another allowed root for absolute "
                        "paths or s3:// URIs (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the table's manifest as JSON")
    args = parser.parse_args(argv)
    uri = table_arguments(parser, args, "videos", ("videos",))["videos"]
    rows = read_videos(args.manifest, video_root=args.video_root, roots=args.allowed_root)  # ManifestError: exit 65
    manifest = write_videos(rows, uri)
    stagecli.report(args, [f"videos: {manifest.rows} rows -> {manifest.uri}"], manifest.to_dict())
    return manifest


if __name__ == "__main__":
    from leanpo_core.launch import stage_entry

    stage_entry(main)
