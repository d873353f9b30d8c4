"""Run a stage in a subprocess the project owns: its own process group, output streamed, killed on failure or cancel.

GPU stages (vLLM sampling, scoring, DeepSpeed training) run as `python -m leanpo_core.<stage>` children so that the
orchestrator's process never holds a CUDA context, OpenMP thread bindings or a NCCL/gloo group, and so that a
cancelled or timed-out run leaves no orphans: the child starts a new session and the whole group is signalled
(SIGTERM, then SIGKILL after a grace period), since cancelling a Prefect run does not kill processes it started.

    from leanpo_core.launch import run_module
    run_module("leanpo_core.sample", ["--config", "sample.yaml", ...], timeout_s=3600, log=logger.info)
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence


class LaunchError(RuntimeError):
    """The child failed (non-zero exit, signal or timeout); the message ends with its last output lines."""

    def __init__(self, message: str, returncode: int | None, tail: list[str]):
        super().__init__(message + ("\n--- last output ---\n" + "\n".join(tail) if tail else ""))
        self.returncode = returncode
        self.tail = tail


def _kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the group, give the leader `grace_s` to exit cleanly, then SIGKILL whatever is left of the group
    (a worker that ignores SIGTERM would otherwise outlive a leader that obeyed it)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
        timeout_s: float | None = None, log: Callable[[str], None] = print, tail_lines: int = 40,
        grace_s: float = 10.0) -> None:
    """Run `cmd` to completion in a new process group, passing each output line (stdout+stderr) to `log`.

    Raises LaunchError with the last `tail_lines` lines if it exits non-zero or runs past `timeout_s`; on any
    exception in the caller (KeyboardInterrupt, a cancellation) the group is killed before re-raising.
    """
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1,
                            start_new_session=True)

    def pump() -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while proc.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                _kill_group(proc, grace_s)
                reader.join(timeout=5)
                raise LaunchError(f"{cmd[0]} ... ran past its {timeout_s:.0f} s limit and was killed", None, list(tail))
            time.sleep(0.2)
    except BaseException:
        _kill_group(proc, grace_s)
        raise
    reader.join(timeout=5)
    _kill_group(proc, grace_s)  # the leader is gone; stray children of the group must not outlive it
    if proc.returncode != 0:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        raise LaunchError(f"{' '.join(cmd[:4])} ... failed with {how}", proc.returncode, list(tail))


def run_module(module: str, args: Sequence[str] = (), **kwargs) -> None:
    """`run` for `python -m module args...` with this interpreter (so the child sees the same environment)."""
    env = kwargs.pop("env", None)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    run([sys.executable, "-m", module, *args], env=env, **kwargs)
