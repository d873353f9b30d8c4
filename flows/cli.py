"""`leanpo`: the command line for the common actions.

    leanpo demo                       the main job on the embedded default: toy model, synthetic clips, data refresh
    leanpo inspect URI [--rows 5]     schema, row count and first rows of any table the pipeline wrote (local or s3://)
    leanpo toy --family F --out DIR   build a tiny offline model of a family

S3 locations use the endpoint in LEANPO_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL) and credentials from the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pyarrow as pa


def _cell(value, width: int = 60) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    text = repr(value) if not isinstance(value, str) else value
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def inspect_table(uri: str, rows: int = 5) -> pa.Table:
    """Print a stored table's kind, version, schema, row count and first rows; return the table."""
    from rich.console import Console
    from rich.table import Table

    from leanpo_core import io

    table, spec = io.read_any(uri)
    console = Console()
    kind = f"{spec.name} v{spec.version}" if spec else "not a leanpo table (no schema metadata)"
    console.print(f"[bold]{uri}[/bold]  {kind}  {table.num_rows} rows")
    for field in table.schema:
        console.print(f"  {field.name}: {field.type}{'' if field.nullable else ' (required)'}")
    for index, row in enumerate(table.slice(0, rows).to_pylist()):
        record = Table(title=f"row {index}", show_header=False, title_justify="left")
        record.add_column(style="cyan", no_wrap=True)
        record.add_column(overflow="fold")
        for name in table.column_names:
            record.add_row(name, _cell(row[name], width=200))
        console.print(record)
    return table


def prefect_environment(workdir: str) -> None:
    """Defaults for a local temporary Prefect server, set before Prefect is imported (it reads settings once).

    The database lives in `<workdir>/.prefect` unless PREFECT_HOME or PREFECT_API_URL say otherwise, so a later
    `prefect server start` with the same PREFECT_HOME shows the runs in the UI. A fresh database takes 13-18 s to
    start, close to Prefect's default 20 s timeout, hence 120 s.
    """
    os.environ.setdefault("PREFECT_HOME", str(Path(workdir).resolve() / ".prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect creates only the last folder
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="leanpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the main job on the embedded default")
    demo.add_argument("--workdir", default="runs/demo", help="where tables, models and the Prefect database go "
                      "(default: runs/demo)")
    demo.add_argument("--family", default="qwen2_vl", help="toy model family (default: qwen2_vl)")
    demo.add_argument("--videos", type=int, default=12, help="synthetic clips to generate (default: 12)")

    inspect = commands.add_parser("inspect", help="show a Parquet table's schema, row count and first rows")
    inspect.add_argument("uri", help="table location: a local path or s3://bucket/key")
    inspect.add_argument("--rows", type=int, default=5, help="rows to show (default: 5)")

    commands.add_parser("toy", help="build a tiny offline model (see `leanpo toy --help`)", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "toy":
        from leanpo_core.toy import main as toy_main

        toy_main(rest)
        return 0
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.command == "inspect":
        from leanpo_core.io import StorageError

        try:
            inspect_table(args.uri, args.rows)
        except (FileNotFoundError, StorageError, ValueError) as exc:
            print(f"leanpo inspect: {exc}", file=sys.stderr)
            return 1
        return 0
    prefect_environment(args.workdir)
    from flows.demo import run_demo

    run_demo(args.workdir, args.family, args.videos)
    return 0


if __name__ == "__main__":
    sys.exit(main())
