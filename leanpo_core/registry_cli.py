"""`leanpo models`: the model registry (leanpo_core/registry.py) on the command line.

    python -m leanpo_core.registry_cli register --root runs/nightly \\
        --published runs/nightly/train/R/published.json --pairs runs/nightly/pairs.parquet --round 0
    python -m leanpo_core.registry_cli list --root runs/nightly            # lineage and status of every model
    python -m leanpo_core.registry_cli promote R --alias production --reason "beats the SFT model on test" --root ...
    python -m leanpo_core.registry_cli reject R2 --reason "accuracy -4.9 pp" --root ...
    python -m leanpo_core.registry_cli rollback --alias production --reason "regression in production" --root ...
    leanpo models list|show|history|current|register|promote|reject|rollback ...    # the same, through the CLI

Where it lives: `--registry URI` (a local folder or an s3:// prefix), or `--root ROOT` for the run layout's
`<root>/registry`. Every command takes `--json` for machines; without it, a table for humans.

What the events mean, how a promotion stays atomic and which requests are refused: leanpo_core/registry.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from typing import Any

from leanpo_core import io
from leanpo_core.launch import DETERMINISTIC, EXIT_BAD_INPUT
from leanpo_core.registry import (DEFAULT_ALIAS, HEADLINE_METRICS, LINEAGE, Registry, RegistryError, State, _absolute,
                                  _jsonable)


def _headline(evaluation: dict) -> str:
    for metric in [*HEADLINE_METRICS, *sorted(evaluation)]:
        if metric in evaluation:
            result = evaluation[metric]
            return f"{metric} {result['value']:.3f} (n={result['n']})"
    return ""


def _short(value: Any, width: int = 10) -> str:
    return "" if value is None else str(value)[:width]


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _render(title: str, columns: list[str], rows: list[list[str]], width: int | None = None) -> str:
    import io as _io

    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=title, title_justify="left")
    for name in columns:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console = Console(file=_io.StringIO(), width=width or 160, record=True, color_system=None)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


def render_models(registry: Registry, state: State, width: int | None = None) -> str:
    """The models with their lineage (a table), and each alias's current model."""
    rows = [[m["model_id"], m["status"] + (f" ({', '.join(m['aliases'])})" if m["aliases"] else ""),
             _short(m["base_model"], 40), _short(m["pairs_hash"]), _short(m["config_hash"]),
             _short(m["round"]), _short(m["steps"]),
             "" if m["final_loss"] is None else f"{m['final_loss']:.4f}", _headline(m["evaluation"]),
             _when(m["registered_at"]), m["registered_by"]]
            for m in state.models.values()]
    current = "; ".join(f"{alias} -> {model_id}" for alias, model_id in state.current.items()) or "none"
    return _render(f"registry {registry.uri}: {len(rows)} model(s); current: {current}",
                   ["model", "status", "base model", "pairs sha256", "config", "round", "steps", "final loss",
                    "evaluation", "registered (UTC)", "by"], rows, width)


def render_events(events: list[dict], width: int | None = None) -> str:
    rows = [[_when(e["created_at"]), e["event"], e["model_id"], e["alias"] or "", e["previous_model_id"] or "",
             e["created_by"], e["reason"] or ""] for e in events]
    return _render(f"{len(rows)} event(s)", ["when (UTC)", "event", "model", "alias", "previous", "by", "reason"],
                   rows, width)


def render_model(model: dict, events: list[dict], width: int | None = None) -> str:
    lines = [f"model {model['model_id']}: {model['status']}"
             + (f" for {', '.join(model['aliases'])}" if model["aliases"] else "")]
    if model["rejected"]:
        rejected = model["rejected"]
        lines.append(f"  rejected {_when(rejected['at'])} by {rejected['by']}: {rejected['reason']}")
    for name in (*LINEAGE, "registered_at", "registered_by", "reason"):
        value = model[name]
        shown = _when(value) if isinstance(value, dt.datetime) else "" if value is None else value
        lines.append(f"  {name:<15} {shown}")
    for key, value in model["details"].items():
        lines.append(f"  {key:<15} {value}")
    text = "\n".join(lines) + "\n"
    if model["evaluation"]:
        rows = [[metric, r.get("split") or "", f"{r['value']:.4f}", str(r["n"]),
                 "" if r.get("ci_low") is None else f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]"]
                for metric, r in sorted(model["evaluation"].items())]
        text += _render("evaluation", ["metric", "split", "value", "n", "95% interval"], rows, width)
    return text + render_events(events, width)


def _location(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    if args.registry:
        return args.registry
    if args.root:
        from leanpo_core.layout import RunLayout

        return RunLayout(args.root).registry
    parser.error("give --registry URI or --root ROOT (the registry is then <root>/registry)")


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--registry", metavar="URI", help="the registry's folder or s3:// prefix")
    where.add_argument("--root", help="a run root: the registry is <root>/registry")
    where.add_argument("--json", action="store_true", help="print JSON instead of a table")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = lambda name, help: commands.add_parser(name, help=help, description=help, parents=[where])  # noqa: E731

    sub("list", "every model with its lineage and status, and each alias's current model")
    show = sub("show", "one model: lineage, evaluation results and its events")
    show.add_argument("model_id")
    history = sub("history", "the events (who, what, when, why), oldest first")
    history.add_argument("--alias", help="only this alias's events")
    history.add_argument("--model", dest="model_id", help="only events about this model")
    current = sub("current", "the alias's current model (prints its id and folder)")
    current.add_argument("--alias", default=DEFAULT_ALIAS, help=f"default: {DEFAULT_ALIAS}")

    register = sub("register", "record a trained model and its lineage")
    register.add_argument("--model", help="the model folder (local or s3://); default: the --published record's")
    register.add_argument("--id", dest="model_id", help="model id; default: the --published record's run id")
    register.add_argument("--published", metavar="URI", help="a train flow's published.json: model folder, base "
                          "model, objective, run id, steps, final loss, metrics and evaluation tables")
    register.add_argument("--base-model", help="the model it was trained from")
    register.add_argument("--objective", help="leanpo | simpo | dpo | sft")
    register.add_argument("--run-id", help="the training run id")
    register.add_argument("--pairs", metavar="URI", help="the pairs table it was trained on (its sha256 is recorded)")
    register.add_argument("--config-hash", help="the TrainConfig's config_hash")
    register.add_argument("--train-config", metavar="FILE", help="a train.yaml: its TrainConfig's hash is recorded")
    register.add_argument("--round", type=int, help="self-improvement round")
    register.add_argument("--metrics", metavar="URI", help="its train_metrics table (steps and final loss)")
    register.add_argument("--evaluation", metavar="URI", help="its evaluation table (results of the first model)")
    register.add_argument("--copy", action="store_true", help="copy the folder to <registry>/models/<id>")
    register.add_argument("--reason", help="why it is registered (optional)")
    register.add_argument("--by", help="who registers it (default: user@host)")

    promote = sub("promote", "make a model the alias's current model (one atomic write, recorded)")
    promote.add_argument("model_id")
    reject = sub("reject", "record that a candidate is refused; nothing current changes")
    reject.add_argument("model_id")
    rollback = sub("rollback", "make the alias's model before its latest promotion current again (recorded)")
    for command in (promote, reject, rollback):
        command.add_argument("--alias", default=None if command is reject else DEFAULT_ALIAS,
                             help="the deployment alias" + ("" if command is reject else f" (default: "
                                                                                         f"{DEFAULT_ALIAS})"))
        command.add_argument("--reason", required=True, help="why (recorded)")
        command.add_argument("--by", help="who (default: user@host)")
    return parser


def _register_args(registry: Registry, args: argparse.Namespace) -> dict:
    fields: dict[str, Any] = {}
    if args.published:
        record = json.loads(io.read_bytes(_absolute(args.published), registry.options))
        fields = {"model_uri": record.get("model"), "base_model": record.get("base_model"),
                  "objective": record.get("objective"), "run_id": record.get("run_id"),
                  "steps": record.get("steps"), "final_loss": record.get("final_loss"),
                  "metrics_uri": record.get("metrics"), "evaluation_uri": record.get("evaluation")}
    given = {"model_uri": args.model, "base_model": args.base_model, "objective": args.objective,
             "run_id": args.run_id, "pairs_uri": args.pairs, "config_hash": args.config_hash, "round": args.round,
             "metrics_uri": args.metrics, "evaluation_uri": args.evaluation}
    fields.update({k: v for k, v in given.items() if v is not None})
    if args.train_config:
        from leanpo_core.config import TrainConfig, load_config

        fields["config_hash"] = load_config(args.train_config, TrainConfig).config_hash()
    model_id = args.model_id or fields.get("run_id")
    if not fields.get("model_uri") or not model_id:
        raise RegistryError("register needs --model and --id (or a --published record that has them)")
    return {"model_id": model_id, **fields}


def main(argv: list[str] | None = None, prog: str = "python -m leanpo_core.registry_cli") -> Any:
    """The CLI (module docstring). A refused request raises RegistryError (exit 65 through `stage_entry`/`cli`);
    an unreachable store prints one line naming it and exits 1."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    registry = Registry(_location(parser, args))
    width = shutil.get_terminal_size((200, 24)).columns  # COLUMNS, else the terminal's, else 200 (a pipe)
    try:
        if args.command == "list":
            state = registry.state()
            result: Any = {"registry": registry.uri, "current": state.current,
                           "models": [_jsonable(m) for m in state.models.values()]}
            text = render_models(registry, state, width)
        elif args.command == "show":
            model = registry.get(args.model_id)
            events = registry.history(model_id=args.model_id)
            result = {**_jsonable(model), "events": [_jsonable(e) for e in events]}
            text = render_model(model, events, width)
        elif args.command == "history":
            events = registry.history(args.alias, args.model_id)
            result, text = [_jsonable(e) for e in events], render_events(events, width)
        elif args.command == "current":
            model = registry.current(args.alias)
            result = _jsonable(model) if model else None
            text = f"{model['model_id']}\t{model['model_uri']}\n" if model else f"no current model for {args.alias}\n"
        elif args.command == "register":
            model = registry.register(**_register_args(registry, args), copy=args.copy, reason=args.reason,
                                      by=args.by)
            result, text = _jsonable(model), f"registered {model['model_id']}: {model['model_uri']}\n"
        else:
            if args.command == "promote":
                event = registry.promote(args.alias, args.model_id, args.reason, args.by)
                text = (f"promoted {event['model_id']} to {event['alias']} (was {event['previous_model_id'] or 'none'})"
                        "\n")
            elif args.command == "reject":
                event = registry.reject(args.model_id, args.reason, args.by, args.alias)
                text = f"rejected {event['model_id']}: {event['reason']}\n"
            else:
                event = registry.rollback(args.alias, args.reason, args.by)
                text = f"rolled {event['alias']} back to {event['model_id']} (was {event['previous_model_id']})\n"
            result = _jsonable(event)
    except io.StorageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from exc
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(text, end="")
    return result


def cli(argv: list[str] | None = None, prog: str = "leanpo models") -> int:
    """`main` for `leanpo models`: the exit code instead of an exception; a refused request is one line, exit 65."""
    try:
        main(argv, prog)
    except DETERMINISTIC as exc:
        text = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"{prog}: {text}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


if __name__ == "__main__":
    from leanpo_core.launch import stage_entry

    stage_entry(main, hard_exit=True)  # its writes are committed when main returns
