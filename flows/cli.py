"""`leanpo`: the command line for the common actions.

    leanpo demo                       the main job on the embedded default, in the toy world: its SFT model and
                                      synthetic clips, data refresh, LeanPO training, held-out accuracy
                                      before/after with 95% intervals, per question type
    leanpo run FLOW --config FILE     run a flow (data-refresh, train, pipeline, export) with its parameters from
                                      YAML/JSON (--plan: the GPU memory plan first; stop if a stage would not fit)
    leanpo server [--port 4200]       the local Prefect server + UI (127.0.0.1) on this project's database; the UI
                                      calls the API on the same address and port (--host: see `leanpo server -h`)
    leanpo serve [--config FILE]      serve prefect.yaml's deployments in this process: nightly data refresh,
                                      retrain weekly and on new pairs (event leanpo.pairs.published), export of
                                      each promoted model (event leanpo.model.promoted), manual pipeline
    leanpo inspect URI [--rows 5]     schema, row count and first rows of any table the pipeline wrote (local or s3://)
    leanpo toy --family F --out DIR   build a tiny offline model of a family
    leanpo plan --model M [--gpus N]  tokens and peak GPU memory of each stage before a run, from config.json
    leanpo models list|show|history|current|register|promote|reject|rollback --root ROOT
                                      the model registry: every trained model with its lineage, the current model
                                      per alias; a promotion, rejection or rollback is one atomic, recorded write

Prefect's database lives in PREFECT_HOME, by default `runs/.prefect` under the current folder, so `leanpo server`
shows every run that `leanpo demo` and `leanpo run` made. `leanpo run` and `leanpo serve` use a `leanpo server`
answering on 127.0.0.1:4200 (runs show live in its UI), else a server on that database for the duration of the
command: `leanpo run`, like `leanpo demo`, Prefect's temporary one; `leanpo serve` a server with its UI on a free
loopback port, whose address it prints. PREFECT_API_URL, when set, always wins.

`leanpo serve` vs `prefect deploy --all`: both read the deployments from prefect.yaml (flows/deployments.py).
`serve` registers them and runs their flow runs itself, in this process (one machine, nothing else to start;
stopping it pauses their schedules), with parameters from prefect.yaml's environment templates and its --config;
`prefect deploy --all` sends runs to a work pool, and a `prefect worker` on the GPU host executes them, which is how
several machines share the work.

The console shows one line per stage (rows written, time) plus Prefect's task states, and in a terminal a progress
bar under them while sampling or training runs (plain lines in a pipe or a log file); what the stage processes
print (vLLM, transformers, DeepSpeed ranks) goes to the task run's log in the Prefect UI and to the log file
(`leanpo demo`: <workdir>/leanpo.log; `--log-file` for the others). `--verbose` puts it all on the console too and
lets transformers' progress bars and vLLM's INFO lines through (LEANPO_VERBOSE=1 does the same).

S3 locations use the endpoint in LEANPO_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL) and credentials from the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa

from leanpo_core.config import read_document
from leanpo_core.launch import VERBOSE_ENV, child_environment
from leanpo_core.loopback_store import is_loopback

FLOWS = {"data-refresh": ("flows.data_refresh", "data_refresh"), "train": ("flows.train", "train_flow"),
         "pipeline": ("flows.pipeline", "pipeline"), "export": ("flows.export", "export_flow")}
DEFAULT_HOME = Path("runs") / ".prefect"


def inspect_table(uri: str, rows: int = 5) -> pa.Table:
    """Print a stored table's kind, version, schema, row count and first rows; return the table."""
    from rich.console import Console
    from rich.table import Table

    from leanpo_core import io

    table, spec = io.read_any(uri)
    console = Console()
    kind = f"{spec.name} v{spec.version}" if spec else "not a leanpo table (no schema metadata)"
    console.print(f"[bold]{uri}[/bold]  {kind}  {table.num_rows} rows", soft_wrap=True)  # one line to grep
    for field in table.schema:
        console.print(f"  {field.name}: {field.type}{'' if field.nullable else ' (required)'}", soft_wrap=True)
    for index, row in enumerate(table.slice(0, rows).to_pylist()):
        record = Table(title=f"row {index}", show_header=False, title_justify="left")
        record.add_column(style="cyan", no_wrap=True)
        record.add_column(overflow="fold")
        for name in table.column_names:
            record.add_row(name, str(io.preview(row[name], width=200)).replace("\n", "\\n"))
        console.print(record)
    return table


def prefect_environment() -> None:
    """Defaults for Prefect, set before it is imported (it reads settings once).

    The database lives in PREFECT_HOME (default `runs/.prefect`), so `leanpo server` shows the runs. A fresh
    database takes 13-18 s to start, close to Prefect's default 20 s timeout, hence 120 s.
    """
    os.environ.setdefault("PREFECT_HOME", str(DEFAULT_HOME.resolve()))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect creates only the last folder
    # Task results (what the cache serves) beside the database: Prefect 3.7 otherwise keeps them in
    # ~/.prefect/storage whatever PREFECT_HOME says.
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(Path(os.environ["PREFECT_HOME"]) / "storage"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.update(child_environment())  # quiet third-party bars in this process too, unless verbose


def attach_log_file(path: str | Path) -> Path:
    """Every log line of this process (Prefect's, the tasks', the stage children's) also appended to `path`."""
    from prefect.logging import configuration
    from prefect.logging.formatters import PrefectFormatter

    if not configuration.PROCESS_LOGGING_CONFIG:  # Prefect's first: seeing a handler on the root already, it
        configuration.setup_logging()             # would leave the root, and so its console, unconfigured

    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(PrefectFormatter(
        format="%(asctime)s | %(levelname)-7s | %(name)s - %(message)s",
        flow_run_fmt="%(asctime)s | %(levelname)-7s | Flow run %(flow_run_name)r - %(message)s",
        task_run_fmt="%(asctime)s | %(levelname)-7s | Task run %(task_run_name)r - %(message)s"))
    logging.getLogger().addHandler(handler)  # Prefect's run loggers propagate to the root
    return path


def use_local_server(port: int = 4200) -> None:
    """Point Prefect at a `leanpo server` already answering on 127.0.0.1:`port` (runs then show live in its UI);
    otherwise leave it to start a temporary server. An explicit PREFECT_API_URL always wins."""
    import urllib.request

    if os.environ.get("PREFECT_API_URL"):
        return
    api = f"http://127.0.0.1:{port}/api"
    try:
        if urllib.request.urlopen(f"{api}/health", timeout=1).read().strip() == b"true":
            os.environ["PREFECT_API_URL"] = api
    except OSError:
        pass


def load_flow(name: str):
    import importlib

    module, attribute = FLOWS[name]
    return getattr(importlib.import_module(module), attribute)


def flow_parameters(flow_obj, data: dict, source: str) -> dict:
    """`data` validated against the flow's signature (stage configs become their models); ConfigError names every
    bad field, before any work starts."""
    from prefect.exceptions import ParameterTypeError, SignatureMismatchError

    from leanpo_core.config import ConfigError

    try:
        return flow_obj.validate_parameters(data)
    except (ParameterTypeError, SignatureMismatchError) as exc:
        raise ConfigError(f"invalid parameters for flow {flow_obj.name!r} in {source}:\n{exc}") from exc


def run_flow(name: str, config: str) -> dict:
    """Validate a config file against flow `name`'s parameters, then run the flow (a temporary server when no
    PREFECT_API_URL is set)."""
    flow_obj = load_flow(name)
    parameters = flow_parameters(flow_obj, read_document(config), config)
    return flow_obj(**parameters)


def check_plan(name: str, config: str, gpus: int, gpu_memory_gib: float) -> None:
    """`leanpo run --plan`: print the memory plan of the config's model and stages (leanpo_core.plan); ConfigError,
    before any server or stage starts, when a stage would not fit."""
    from leanpo_core.config import ConfigError
    from leanpo_core.plan import plan_run, render

    parameters = flow_parameters(load_flow(name), read_document(config), config)
    result, refused = plan_run(parameters, gpus, gpu_memory_gib, config)
    print(render(result, shutil.get_terminal_size().columns if sys.stdout.isatty() else None), end="", flush=True)
    if refused:
        lines = "\n".join(f"  {r.stage} at {r.frames} frames: {r.peak_gib:.1f} GiB; {r.advice}" for r in refused)
        raise ConfigError(f"{len(refused)} stage(s) would not fit {gpus} GPU(s) x {gpu_memory_gib:g} GiB; nothing "
                          f"started:\n{lines}")


def remote_warning(host: str, port: int) -> str | None:
    """None when `host` is loopback; otherwise the warning `leanpo server` prints before binding it."""
    if is_loopback(host):
        return None
    return (f"serving on {host}:{port}, not loopback: the Prefect API has no authentication by default, so anyone who "
            f"reaches that port can read every run and start flows (which run code on the workers). Put it behind "
            f"a firewall or set PREFECT_SERVER_API_AUTH_STRING=user:password (basic auth; plain HTTP). Browsers on "
            f"other machines need PREFECT_UI_API_URL=http://<this machine's address>:{port}/api")


def server_url(host: str, port: int) -> str:
    """Where a browser on this machine reaches a server bound to `host`: a wildcard address by loopback."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return f"http://[{address}]:{port}" if address.version == 6 else f"http://{address}:{port}"


def start_server(port: int, host: str = "127.0.0.1") -> int:
    """`prefect server start` on `host`:`port` with this project's PREFECT_HOME, in the foreground (Ctrl-C stops)."""
    prefect = Path(sys.executable).with_name("prefect")
    url = server_url(host, port)
    env = dict(os.environ)
    # `prefect server start --port` only binds the port: the UI asks /ui-settings where the API is, and Prefect
    # answers PREFECT_UI_API_URL, derived (when unset) from PREFECT_API_URL or PREFECT_SERVER_API_HOST/PORT,
    # i.e. 127.0.0.1:4200, whatever --port says. One the user set (a proxy, a remote browser) is kept.
    if not (env.get("PREFECT_UI_API_URL") or env.get("PREFECT_SERVER_UI_API_URL")):
        env["PREFECT_UI_API_URL"] = f"{url}/api"
    print(f"Prefect UI at {url} (database in {os.environ['PREFECT_HOME']}); other shells: "
          f"export PREFECT_API_URL={url}/api", flush=True)
    try:
        return subprocess.call([str(prefect), "server", "start", "--host", host, "--port", str(port)], env=env)
    except KeyboardInterrupt:
        return 0


def partial_parameters(flow_obj, data: dict, source: str) -> dict:
    """Check the parameters given in `data` (others may come later: a trigger, the UI's form); ConfigError names
    the bad field. Returns `data` as given (JSON-ready, for a deployment's defaults)."""
    import typing

    from pydantic import TypeAdapter, ValidationError

    from leanpo_core.config import ConfigError

    hints = typing.get_type_hints(flow_obj.fn, include_extras=True)
    unknown = sorted(set(data) - set(hints) - {"return"})
    if unknown:
        raise ConfigError(f"{source}: flow {flow_obj.name!r} has no parameter(s) {unknown}")
    problems = []
    for name, value in data.items():
        try:
            TypeAdapter(hints[name]).validate_python(value)
        except ValidationError as exc:
            problems += [f" - {'.'.join(map(str, (name, *e['loc'])))}: {e['msg']}" for e in exc.errors()]
    if problems:
        raise ConfigError(f"invalid parameters for flow {flow_obj.name!r} in {source}:\n" + "\n".join(problems))
    return data


@contextlib.contextmanager
def serving_server(timeout_s: float = 180.0):
    """For `leanpo serve` when no server answers (no PREFECT_API_URL, no `leanpo server` on 4200): Prefect's server
    and UI on a free loopback port for the life of the command, started in a session of its own. Prefect's temporary
    server would share this process's group, so a Ctrl-C in the terminal stopped it first, and the runner, pausing
    its deployments on the way out, retried against a dead server and never exited."""
    import urllib.request

    from leanpo_core.launch import free_port

    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    url = server_url("127.0.0.1", free_port())
    log = Path(os.environ["PREFECT_HOME"]) / "serve-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_UI_API_URL": f"{url}/api"}
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                                 "127.0.0.1", "--port", url.rsplit(":", 1)[1]], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if urllib.request.urlopen(f"{url}/api/health", timeout=2).read().strip() == b"true":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server for `leanpo serve` did not start (see {log})")
            time.sleep(0.5)
        os.environ["PREFECT_API_URL"] = f"{url}/api"
        print(f"leanpo serve: Prefect UI at {url}, a server for this command that stops with it (its log: {log}); "
              f"other shells: export PREFECT_API_URL={url}/api", flush=True)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(config: str | None) -> None:
    """Serve prefect.yaml's deployments in this process (flows/deployments.py); parameters per flow from `config`."""
    from prefect import serve as prefect_serve

    from flows.deployments import runner_deployments
    from leanpo_core.config import ConfigError

    sections = read_document(config) if config else {}
    unknown = sorted(set(sections) - set(FLOWS))
    if unknown:
        raise ConfigError(f"config {config}: unknown section(s) {unknown}; expected some of {sorted(FLOWS)}")
    for name, section in sections.items():
        partial_parameters(load_flow(name), section or {}, f"{config} [{name}]")
    deployments, notes = runner_deployments(sections, FLOWS, load_flow)
    for note in notes:
        print(f"leanpo serve: {note}", file=sys.stderr)
    with serving_server():
        prefect_serve(*deployments)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="leanpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the main job on the embedded default")
    demo.add_argument("--workdir", default="runs/demo", help="where tables and models go (default: runs/demo)")
    demo.add_argument("--max-train-questions", type=int, default=0, metavar="N",
                      help="use the first N questions of the world's train split for pairs (default 0: all)")
    demo.add_argument("--max-test-questions", type=int, default=0, metavar="N",
                      help="evaluate on the first N questions of the test split (default 0: all)")

    demo.add_argument("--log-file", metavar="PATH",
                      help="where every log line goes, the stage processes' included (default: WORKDIR/leanpo.log)")

    run = commands.add_parser("run", help="run a flow with its parameters from a YAML/JSON file")
    run.add_argument("flow", choices=sorted(FLOWS), help="which flow")
    run.add_argument("--config", required=True, help="YAML/JSON mapping of the flow's parameters (stage configs "
                     "as nested mappings, e.g. sample: {model: /models/sft})")
    run.add_argument("--log-file", metavar="PATH", help="also append every log line, the stage processes' "
                     "included, to this file (they always reach the Prefect UI)")
    run.add_argument("--plan", action="store_true", help="first print the tokens and peak GPU memory of every stage "
                     "for the config's model (as `leanpo plan`), and stop (exit 2) if a stage would not fit")
    run.add_argument("--gpus", type=int, default=1, help="with --plan: GPUs training runs on (default 1)")
    run.add_argument("--gpu-memory-gib", type=float, default=80.0, help="with --plan: memory per GPU (default 80)")

    server = commands.add_parser("server", help="start the local Prefect server and UI (127.0.0.1 by default)",
                                 description="Prefect's server and UI on this project's database (PREFECT_HOME). "
                                 "The UI calls the API on the same address and port (PREFECT_UI_API_URL, when set, "
                                 "wins).")
    server.add_argument("--port", type=int, default=4200, help="port (default: 4200)")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1); anything but loopback needs --allow-remote")
    server.add_argument("--allow-remote", action="store_true",
                        help="allow a --host that is not loopback, with a warning: the Prefect API has no "
                        "authentication by default, so anyone who reaches the port can read runs and start flows")

    served = commands.add_parser("serve", help="serve prefect.yaml's deployments (schedules, triggers) in-process")
    served.add_argument("--config", help="YAML/JSON with a section of parameters per flow: data-refresh, train, "
                        "pipeline, export, merged over prefect.yaml's (whose $VARs come from the environment); a "
                        "schedule is served only when its runs have every required parameter")
    for command in (demo, run, served):
        command.add_argument("--verbose", action="store_true",
                             help="every stage process line on the console too, with third-party progress bars "
                             "and vLLM's INFO lines (default: one line per stage; the rest in the log and the UI)")

    inspect = commands.add_parser("inspect", help="show a Parquet table's schema, row count and first rows")
    inspect.add_argument("uri", help="table location: a local path or s3://bucket/key; a sharded table's folder "
                         "(frames, samples, scored, failures) shows its shards together")
    inspect.add_argument("--rows", type=int, default=5, help="rows to show (default: 5)")

    commands.add_parser("toy", help="build a tiny offline model (see `leanpo toy --help`)", add_help=False)
    commands.add_parser("plan", help="tokens and GPU memory per stage before a run (see `leanpo plan --help`)",
                        add_help=False)
    commands.add_parser("models", help="the model registry: list, show, promote, reject, rollback (see `leanpo "
                        "models --help`)", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "toy":
        from leanpo_core.toy import main as toy_main

        toy_main(rest)
        return 0
    if args.command == "plan":
        from leanpo_core.plan import main as plan_main

        plan_main(rest)
        return 0
    if args.command == "models":
        from leanpo_core.registry_cli import cli as models_cli

        return models_cli(rest, prog="leanpo models")
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
    if args.command == "server":
        warning = remote_warning(args.host, args.port)
        if warning and not args.allow_remote:
            server.error(f"--host {args.host} is not a loopback address: anyone who reaches the port could run "
                         f"flows (the Prefect API has no authentication by default); pass --allow-remote to bind it "
                         f"anyway")
        if warning:
            print(f"leanpo server: WARNING: {warning}", file=sys.stderr, flush=True)
    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"
    prefect_environment()
    if args.command == "server":
        return start_server(args.port, args.host)
    from leanpo_core.config import ConfigError

    if args.command == "run" and args.plan:
        try:
            check_plan(args.flow, args.config, args.gpus, args.gpu_memory_gib)
        except ConfigError as exc:
            print(f"leanpo run: {exc}", file=sys.stderr)
            return 2
    if args.command in ("run", "serve"):
        use_local_server()
    try:
        if args.command in ("run", "demo") and (args.log_file or args.command == "demo"):
            path = attach_log_file(args.log_file or Path(args.workdir) / "leanpo.log")
            print(f"leanpo {args.command}: full log in {path}", flush=True)
        if args.command == "run":
            result = run_flow(args.flow, args.config)
            print(json.dumps(result, indent=2, default=str))
        elif args.command == "serve":
            serve(args.config)
        else:
            from flows.demo import run_demo

            run_demo(args.workdir, args.max_train_questions, args.max_test_questions)
    except ConfigError as exc:
        print(f"leanpo {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
