"""What every stage's command line shares, so that they all read alike:

    python -m leanpo_core.<stage> --root RUN [--<table> URI ...] [--config FILE] [--set FIELD=VALUE ...]
                                  [--progress | --no-progress] [--json]

  --root             the run root (local folder or s3:// prefix): every table at its layout path (layout.py)
  --<table>          one table's location instead of --root's
  --config           YAML/JSON of the stage's config fields, or a run config holding them under the stage's section
                     (`sample:`, `reflect:`, ...); optional: defaults otherwise
  --set FIELD=VALUE  one config field, over the file's (repeatable); VALUE is read as YAML (3, 0.5, true, [a, b])
  --progress         a progress bar on stderr (default: when stderr is a terminal)
  --json             the result as one JSON object on stdout, for machines (default: one line per table written)

A bad value anywhere (file, --set) stops the stage before any work: exit 65 with the field named (launch.stage_entry).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TypeVar

from leanpo_core.config import ConfigError, StageConfig, read_document
from leanpo_core.layout import add_table_arguments

C = TypeVar("C", bound=StageConfig)


def stage_parser(stage: str, doc: str | None, tables: tuple[str, ...],
                 config: type[StageConfig]) -> argparse.ArgumentParser:
    """The parser of `python -m leanpo_core.<stage>` with the shared options; the stage adds its own."""
    parser = argparse.ArgumentParser(prog=f"python -m leanpo_core.{stage}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_table_arguments(parser, stage, tables)
    parser.add_argument("--config", help=f"YAML/JSON of {config.__name__} fields, or a run config with them under "
                        f"`{stage}:` (default: the defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="set one config field over the file's (repeatable); VALUE is read as YAML")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress bar on stderr (default: when stderr is a terminal)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (default: a line per table)")
    return parser


def stage_config(args: argparse.Namespace, cls: type[C], section: str) -> C:
    """`cls` from --config (its fields, or a run config's `section:`) with each --set applied; ConfigError names the
    file or option and the field."""
    import yaml
    from pydantic import ValidationError

    data: dict[str, Any] = read_document(args.config) if args.config else {}
    if isinstance(data.get(section), dict) and section not in cls.model_fields:
        data = dict(data[section])
    source = f"config {args.config}" if args.config else "config"
    for item in args.set:
        field, sep, text = item.partition("=")
        if not sep or not field:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE")
        if field not in cls.model_fields:
            raise ConfigError(f"--set {field}: {cls.__name__} has no field {field!r} (fields: "
                              f"{', '.join(sorted(cls.model_fields))})")
        try:
            data[field] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {field}: {text!r} is not a YAML value ({exc})") from exc
        source += f" with --set {field}"
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {section} {source}:\n{exc}") from exc


def show_progress(args: argparse.Namespace) -> bool:
    return args.progress if args.progress is not None else sys.stderr.isatty()


def report(args: argparse.Namespace, lines: list[str], result: dict) -> None:
    """The stage's output: one line per table written, or `result` as JSON with --json."""
    print(json.dumps(result, default=str) if args.json else "\n".join(lines), flush=True)
