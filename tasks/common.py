"""What every task shares: which failures are worth a retry, the content-keyed cache, progress and table artifacts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect.artifacts import (create_link_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import CachePolicy
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.logging.loggers import PrefectLogAdapter
from prefect.tasks import exponential_backoff

from leanpo_core import io, schemas
from leanpo_core.config import StageConfig
from leanpo_core.launch import DETERMINISTIC, LaunchError, verbose


def transient_only(task, task_run, state) -> bool:
    """Prefect retry condition: retry I/O, storage and engine-start failures, never a deterministic error
    (`launch.DETERMINISTIC`: the rule a stage process exits EXIT_BAD_INPUT by).

    A launched child that failed deterministically (LaunchError.deterministic: e.g. a Python exception with the
    same input would raise again) is not retried; one killed by a signal, a lost rank or a timeout is.
    """
    try:
        state.result()
    except io.StorageError:
        return True  # StorageError is an OSError, never a ValueError; listed first for clarity
    except LaunchError as exc:
        return not exc.deterministic
    except DETERMINISTIC:
        return False
    except Exception:
        return True
    return False


# Retries where a retry can help: 10 s, then 20 s, only for transient failures (see `transient_only`).
RETRIES = {"retries": 2, "retry_delay_seconds": exponential_backoff(backoff_factor=10),
           "retry_condition_fn": transient_only}

_SOURCES = Path(__file__).resolve().parents[1]


def write_config(config: StageConfig, folder: str) -> str:
    """The stage config as the JSON file a `python -m leanpo_core.<stage> --config` child reads; returns its path."""
    path = Path(folder) / "config.json"
    path.write_text(config.model_dump_json())
    return str(path)


def _code_version() -> str:
    """A hash of the stage code (leanpo_core and tasks): a changed stage invalidates every cached result."""
    digest = hashlib.sha256()
    for package in ("leanpo_core", "tasks"):
        for path in sorted((_SOURCES / package).glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


CODE_VERSION = _code_version()


def _canonical(value: Any) -> Any:
    """What a cache key sees of one task input: a config's hash, a table manifest's content hash, plain values."""
    if isinstance(value, StageConfig):
        return f"{type(value).__name__}:{value.config_hash()}"
    if isinstance(value, dict) and "content_hash" in value:
        return {"uri": value.get("uri"), "content_hash": value["content_hash"]}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else repr(value)


def file_hash(uri: str) -> str | None:
    """sha256 of a stored object's bytes (an input manifest), or None when it cannot be read now."""
    try:
        return hashlib.sha256(io.read_bytes(uri)).hexdigest()
    except OSError:  # FileNotFoundError or StorageError (naming the location, never the credentials)
        return None


@dataclass
class ContentKey(CachePolicy):
    """Cache key = task + code version + inputs by content (config hashes, table content hashes, file hashes).

    `files(inputs)` names input files (an external manifest) whose bytes are hashed into the key; when one cannot
    be read, nothing is cached. Results persist in Prefect's result storage, so a later flow run with the same
    inputs skips the task (its state is named "Cached") and returns the stored manifest. A table deleted after
    its stage ran is not noticed: re-run with PREFECT_TASKS_REFRESH_CACHE=true to recompute every stage.
    """

    files: Callable[[dict], list[str]] | None = field(default=None)

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        hashes = [file_hash(uri) for uri in (self.files(inputs) if self.files else [])]
        if any(h is None for h in hashes):
            return None
        payload = {"task": task_ctx.task.task_key, "code": CODE_VERSION, "files": hashes,
                   "inputs": {name: _canonical(value) for name, value in sorted(inputs.items())}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


GPU_LIMIT = "gpu"


@contextlib.contextmanager
def gpu_slot() -> Iterator[None]:
    """Hold one slot of the `gpu` global concurrency limit while a task holds a model, if an operator created that
    limit (`prefect gcl create gpu --limit 1`, docs/operations.md); without it, nothing is acquired. Prefect's own
    `concurrency(strict=False)` reaches the same outcome only after a lease request that writes to the server: on
    the temporary SQLite server it took 1.7-2.3 s in most task runs (bench/README.md, orchestration); this check is
    one read."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
    except ObjectNotFound:
        yield
        return
    with concurrency(GPU_LIMIT, occupy=1, strict=False):
        yield


def prefect_console():
    """The rich Console through which Prefect's console handler prints log lines, or None (no such handler)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in (logging.getLogger("prefect"), logging.getLogger()):
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                return handler.console
    return None


class TerminalBar:
    """A progress bar on the terminal, drawn by rich on the console Prefect prints its log lines through, so the
    lines scroll above the bar instead of through it. Nothing is drawn when that console is not a terminal (a pipe,
    a log file, CI) or with LEANPO_VERBOSE=1 (then the stage's own lines are the progress); the bar goes away when
    it reaches 100 % or is closed."""

    def __init__(self, description: str, console=None):
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        console = console if console is not None else prefect_console()
        self.progress = None
        if console is None or not console.is_terminal or verbose():
            return
        from rich.default_styles import DEFAULT_STYLES
        from rich.theme import Theme

        # Prefect's console has a theme of its own without rich's progress styles: lend them while the bar shows.
        console.push_theme(Theme({k: v for k, v in DEFAULT_STYLES.items() if k.startswith(("bar.", "progress."))}))
        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)
        self.task = self.progress.add_task(description, total=100.0)
        self.progress.start()

    def update(self, percent: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=percent)
            if percent >= 100.0:
                self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.console.pop_theme()


class Progress:
    """A progress artifact of the running task (0-100 %), updated from any thread, at most every `every_s` (the
    artifact; the terminal bar, when there is one, follows every update)."""

    def __init__(self, key: str, description: str, every_s: float = 2.0):
        self.id = create_progress_artifact(0.0, key=key, description=description)
        self.every_s, self.percent, self.last = every_s, 0.0, 0.0
        self._lock = threading.Lock()
        self.bar = TerminalBar(key)

    def update(self, fraction: float, force: bool = False) -> None:
        percent = round(100.0 * min(max(fraction, 0.0), 1.0), 1)
        self.bar.update(percent)
        with self._lock:
            if percent == self.percent or (not force and time.monotonic() - self.last < self.every_s):
                return
            self.percent, self.last = percent, time.monotonic()
        update_progress_artifact(self.id, percent)

    def close(self) -> None:
        """Take the terminal bar away (a stage that failed before 100 %)."""
        self.bar.close()

    def poll(self, measure: Callable[[], float], every_s: float = 2.0) -> "_Poller":
        """A context manager that calls `measure()` (a fraction done) every `every_s` in a thread, 100 % at exit."""
        return _Poller(self, measure, every_s)


class _Poller:
    def __init__(self, progress: Progress, measure: Callable[[], float], every_s: float):
        self.progress, self.measure, self.every_s = progress, measure, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.progress.update(self.measure())
            except OSError:
                pass  # storage briefly unreachable: the next poll tries again; the stage reports real failures

    def __enter__(self) -> Progress:
        self.thread.start()
        return self.progress

    def __exit__(self, kind, exc, tb) -> None:
        self.stop.set()
        self.thread.join()
        if kind is None:
            self.progress.update(1.0, force=True)
        self.progress.close()


def link(uri: str) -> str:
    """A clickable link for a stored location (local paths become file:// URLs)."""
    return uri if "://" in uri else f"file://{Path(uri).resolve()}"


OUTPUT_LOGGER = "prefect.task_runs.stage_output"


def stage_output_logger() -> logging.LoggerAdapter:
    """The running task's logger for a stage child's output lines (vLLM, transformers, DeepSpeed ranks).

    They reach the task run's log in the Prefect UI and any log file attached to the root logger (`leanpo demo`
    writes one into its workdir), but not the console, where a person reads one line per stage; with
    LEANPO_VERBOSE=1 (`leanpo --verbose`) the console gets them too.
    """
    logger = logging.getLogger(OUTPUT_LOGGER)
    logger.propagate = verbose()
    if not logger.propagate:
        sinks = logging.getLogger("prefect.task_runs").handlers + [
            h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
        logger.handlers = list(dict.fromkeys(sinks))
    return PrefectLogAdapter(logger, extra=dict(get_run_logger().extra))


def publish_table(manifest: io.Manifest, spec: schemas.TableSpec, rows: int = 10, key: str | None = None) -> None:
    """A link to a written table and its first rows, as artifacts of the running task (keys per table name), and
    the one console line a person reads for the stage: rows, where, how long the task took."""
    context = TaskRunContext.get()
    started = context.task_run.start_time if context and context.task_run.start_time else None
    took = f" in {(time.time() - started.timestamp()):.0f} s" if started else ""
    get_run_logger().info(f"{spec.name}: {manifest.rows} rows{took} -> {manifest.uri}")
    key = key or spec.name.replace("_", "-")
    create_link_artifact(key=f"{key}-table", link=link(manifest.uri), link_text=manifest.uri,
                         description=f"`{spec.name}` v{spec.version}: {manifest.rows} rows, sha256 "
                                     f"{manifest.content_hash[:12]}. Open with `leanpo inspect {manifest.uri}`.")
    first = _first_rows(manifest.uri, spec, rows)
    if first:
        create_table_artifact(key=f"{key}-sample", table=[{k: io.preview(v) for k, v in r.items()} for r in first],
                              description=f"First {len(first)} of {manifest.rows} rows of `{manifest.uri}`")


def _first_rows(uri: str, spec: schemas.TableSpec, rows: int) -> list[dict]:
    if uri.endswith(".parquet"):
        return io.read_table(uri, spec).slice(0, rows).to_pylist()
    shards = [u for u in io.list_uris(uri) if u.endswith(".parquet")]
    for shard in shards:
        table = io.read_table(shard, spec)
        if table.num_rows:
            return table.slice(0, rows).to_pylist()
    return []
