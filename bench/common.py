"""Shared by the benchmarks: child processes that report JSON, peak resident memory, medians, the results header."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE, RESULTS = HERE / ".cache", HERE / "results"


def ensure_cache() -> Path:
    """bench/.cache/, which ignores itself in git."""
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    return CACHE


def proc_status_kib(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident since start or last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux clear_refs 5), so a later peak covers only what follows."""
    Path("/proc/self/clear_refs").write_text("5")


def median(values: list[float]) -> float:
    return statistics.median(values)


def time_steps(step, steps: int) -> tuple[list[float], list[float]]:
    """Wall and process (CPU) seconds of each of `steps` calls of `step()`."""
    import time

    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times


def run_child(argv: list[str], python: str | None = None, env: dict | None = None, timeout: float = 1800) -> dict:
    """Run a Python child whose last stdout line is one JSON object; return it (stderr shown on failure)."""
    cmd = [python or sys.executable, *argv]
    full_env = {**os.environ, **(env or {})}
    done = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise RuntimeError(f"child failed ({done.returncode}): {' '.join(cmd)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def emit(result: dict) -> None:
    """A child's report: one JSON line, last on stdout."""
    print(json.dumps(result), flush=True)


def machine_line() -> str:
    """Host, CPUs, load average, threads: ties a results file to the machine it came from."""
    return (f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
            f"load average {os.getloadavg()[0]:.1f} at the end)")


def versions(*names: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in names:
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} (absent)")
    return ", ".join(out)


def write_result(name: str, title: str, command: str, body: list[str]) -> str:
    """Write bench/results/<name>.md: title, command, UTC date, machine, then `body`; return the text."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# {title}", "", f"`{command}`, {now}, on {machine_line()}.", "", *body]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / f"{name}.md.tmp"
    tmp.write_text(text)
    tmp.replace(RESULTS / f"{name}.md")
    return text


def display_path(path: str) -> str:
    """A path as results files show it: relative to the repository when inside it (no machine-specific prefix)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def write_json(name: str, data: dict) -> Path:
    """Write bench/results/<name>.json (atomically, beside the markdown), with the date and machine added."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    RESULTS.mkdir(exist_ok=True)
    tmp, path = RESULTS / f"{name}.json.tmp", RESULTS / f"{name}.json"
    tmp.write_text(json.dumps({"date": now, "machine": machine_line(), **data}, indent=2) + "\n")
    tmp.replace(path)
    return path


def command_line(script: str, argv: list[str] | None) -> str:
    return " ".join([".venv/bin/python", f"bench/{script}", *(argv if argv is not None else sys.argv[1:])])


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def newest_model(root: Path) -> str:
    """The newest `<root>/train/*/model` folder of a run (a model of the run's family, for timing)."""
    found = sorted((Path(root) / "train").glob("*/model"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no trained model under {Path(root) / 'train'}: pass --model")
    return str(found[-1])


def run_relative(path: str, root: Path) -> str:
    """`path` relative to the folder holding the run `root` (no machine-specific prefix in results files)."""
    full, base = Path(path).resolve(), Path(root).resolve().parent
    return str(full.relative_to(base)) if full.is_relative_to(base) else display_path(path)


def run_bench_arguments(parser, root_help: str) -> None:
    """The options of the benches that read a run's own tables: --root, --model, --threads."""
    parser.add_argument("--root", required=True, help=root_help)
    parser.add_argument("--model", help="model folder of the run's family (default: newest <root>/train/*/model)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def run_bench_setup(args) -> tuple[Path, str]:
    """(run root, model folder) of a run bench's arguments, torch's threads set."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.root)
    return root, args.model or newest_model(root)
