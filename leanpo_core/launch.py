"""Run a stage in a subprocess the project owns: its own process group, output streamed, killed on failure or cancel.

GPU stages (vLLM sampling, scoring, DeepSpeed training) run as `python -m leanpo_core.<stage>` children so that the
orchestrator's process never holds a CUDA context, OpenMP thread bindings or a NCCL/gloo group, and so that a
cancelled or timed-out run leaves no orphans: the child starts a new session and the whole group is signalled
(SIGTERM, then SIGKILL after a grace period), since cancelling a Prefect run does not kill processes it started.

    from leanpo_core.launch import run_module
    run_module("leanpo_core.sample", ["--config", "sample.yaml", ...], timeout_s=3600, log=logger.info)
    run_module("leanpo_core.train", [...], launcher="torchrun", nproc_per_node=2)   # or launcher="deepspeed"

A failed child raises LaunchError. Its `deterministic` is True when the stage refused its input (argparse usage, exit
2, or `stage_entry`'s EXIT_BAD_INPUT, also when reported for one rank of a multi-rank run): a retry would fail the
same way. Multi-rank failures name the rank that failed and carry that rank's own last lines.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable, Sequence

# sysexits.h EX_DATAERR: the stage refused its input or config; a retry with the same input fails the same way.
EXIT_BAD_INPUT = 65
_DETERMINISTIC_CODES = (2, EXIT_BAD_INPUT)  # 2: argparse's usage error
LAUNCHERS = ("python", "torchrun", "deepspeed")

# A rank's line as torchrun --tee prints it: "[default1]:text" (role name + local rank).
# Third-party chatter a stage child keeps to itself unless LEANPO_VERBOSE=1 (`leanpo --verbose`): transformers'
# "Loading weights" bars (dozens per stage, each relayed line by line), its advisory warnings, vLLM's INFO lines.
# Errors and warnings still come through; a value the user set wins. The trainer's own step bar is plain tqdm,
# which these leave on: the train task turns it into the run's progress artifact.
VERBOSE_ENV = "LEANPO_VERBOSE"
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def verbose() -> bool:
    """Whether stage children (and the console) get every third-party line: LEANPO_VERBOSE=1."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def child_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with QUIET_ENV filled in where unset, unless `verbose()`."""
    env = dict(os.environ if env is None else env)
    if not verbose():
        for name, value in QUIET_ENV.items():
            env.setdefault(name, value)
    return env


_RANK_LINE = re.compile(r"^\[[A-Za-z_]*?(\d+)\]:(.*)$")
# torchrun's failure summary: "rank      : 1 (local_rank: 1)" then "exitcode  : -9 (pid: 123)".
_TORCHRUN_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)\s*\(local_rank")
_TORCHRUN_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
# deepspeed.launcher.launch: "[..., '--local_rank=1'] exits with return code = -9".
_DEEPSPEED_EXIT = re.compile(r"--local_rank=(\d+).*exits with return code = (-?\d+)")


class LaunchError(RuntimeError):
    """The child failed (non-zero exit, signal or timeout); the message ends with its last output lines.

    For a multi-rank child, `failed_rank` and `rank_returncode` name the rank whose failure took the run down
    (`_failed_rank`; None when the launcher named none) and `rank_tail` holds that rank's own last lines (torchrun
    prefixes them; the deepspeed launcher does not, so there it is empty and `tail` holds the interleaved output).
    """

    def __init__(self, message: str, returncode: int | None, tail: list[str], failed_rank: int | None = None,
                 rank_returncode: int | None = None, rank_tail: list[str] | None = None):
        self.returncode, self.tail = returncode, tail
        self.failed_rank, self.rank_returncode, self.rank_tail = failed_rank, rank_returncode, rank_tail or []
        if failed_rank is not None:
            message += f"; rank {failed_rank} failed with {_how(rank_returncode)}"
        if self.rank_tail:
            message += f"\n--- last output of rank {failed_rank} ---\n" + "\n".join(self.rank_tail)
        super().__init__(message + ("\n--- last output ---\n" + "\n".join(tail) if tail else ""))

    @property
    def deterministic(self) -> bool:
        """True when the child (or its failed rank) refused its input: a retry cannot help."""
        code = self.rank_returncode if self.rank_returncode is not None else self.returncode
        return code in _DETERMINISTIC_CODES


def _how(returncode: int | None) -> str:
    if returncode is None:
        return "an unknown status"
    return f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"


def _failed_rank(lines: Sequence[str]) -> tuple[int | None, int | None]:
    """(rank, its exit code) of the rank whose failure took the run down, from a torchrun or deepspeed launcher's
    report in `lines`; (None, None) if it named none.

    Preference: a rank that refused its input (deterministic, so the whole run is); then a rank ended by a signal
    other than the launcher's SIGTERM (SIGKILL by the OOM killer, a segfault), since its peers then fail on the
    closed connection, possibly within the same second, which torchrun's root cause cannot order; then the first
    failure the launcher reported (torchrun's root cause).
    """
    failures: list[tuple[int, int]] = []
    rank, root = None, False
    for line in lines:
        root = root or "Root Cause" in line  # torchrun lists the other failures first, the root cause last
        if m := _TORCHRUN_RANK.match(line):
            rank = int(m.group(1))
        elif (m := _TORCHRUN_EXIT.match(line)) and rank is not None:
            failures.insert(0 if root else len(failures), (rank, int(m.group(1))))
            rank = None
        elif m := _DEEPSPEED_EXIT.search(line):
            failures.append((int(m.group(1)), int(m.group(2))))
    if not failures:
        return None, None

    def priority(failure: tuple[int, int]) -> int:
        code = failure[1]
        return 0 if code in _DETERMINISTIC_CODES else 1 if code < 0 and code != -signal.SIGTERM else 2

    return min(failures, key=priority)


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

    Raises LaunchError with the last `tail_lines` lines (and, for a multi-rank launcher, the failed rank's own last
    lines) if it exits non-zero or runs past `timeout_s`; on any exception in the caller (KeyboardInterrupt, a
    cancellation) the group is killed before re-raising.
    """
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    by_rank: dict[int, collections.deque[str]] = collections.defaultdict(
        lambda: collections.deque(maxlen=tail_lines))
    launcher_lines: collections.deque[str] = collections.deque(maxlen=400)  # unprefixed: the failure report
    # The child lives in its own session (so its whole group can be killed), which also cuts it loose from ours:
    # `stage_entry` in the child and in every rank watches this process and kills its group when it is gone.
    env = {"PYTHONUNBUFFERED": "1", **child_environment(env), PARENT_PID_ENV: str(os.getpid())}
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1,
                            start_new_session=True)

    def pump() -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if m := _RANK_LINE.match(line):
                by_rank[int(m.group(1))].append(m.group(2))
            else:
                launcher_lines.append(line)
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
        rank, rank_code = _failed_rank(launcher_lines)
        raise LaunchError(f"{_describe(cmd)} ... failed with {_how(proc.returncode)}", proc.returncode,
                          list(tail), rank, rank_code, list(by_rank.get(rank, ())) if rank is not None else None)


def free_port() -> int:
    """A TCP port nothing listens on now, chosen by the kernel (random among free ephemeral ports), so concurrent
    launches do not share the fixed default 29500; the launcher binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOOPBACK_STORE = "leanpo_core.loopback_store"


def _describe(cmd: Sequence[str]) -> str:
    """The start of `cmd` for a message, without the loopback-store wrapper in front of torchrun."""
    words = list(cmd)
    if words[1:4] == ["-m", LOOPBACK_STORE, "--port"]:
        words = [words[0], "-m", *words[5:]]
    return " ".join(words[:4])


def distributed_command(module: str, args: Sequence[str], *, nproc_per_node: int = 1, launcher: str = "torchrun",
                        hostfile: str | None = None, master_port: int | None = None) -> list[str]:
    """The command that runs `python -m module args` under `launcher`, with this interpreter.

    - "python": one plain process (nproc_per_node must be 1, no hostfile).
    - "torchrun" (`python -m torch.distributed.run`): one node, `nproc_per_node` ranks, static rendezvous on
      127.0.0.1 and `master_port` (a free one unless given); `--local-addr 127.0.0.1` makes the ranks reach the
      launcher's store on loopback (MASTER_ADDR), not on the host's name; `--tee 3` prefixes each rank's lines
      with `[default<rank>]:`, which `run` uses to report the failed rank's own lines. Multi-node torchrun needs
      the same command on every node with a rendezvous endpoint; use "deepspeed" with a hostfile for that.
    - "deepspeed" (`python -m deepspeed.launcher.runner`, what the `deepspeed` console script runs): `--num_gpus`
      ranks per node (on a CPU-only machine DeepSpeed's CPU accelerator counts ranks, not devices, and the ranks
      talk over gloo), `--master_port` (a free one unless given), `--hostfile` for several nodes (the runner then
      reaches them with pdsh/ssh and `--master_addr` is the first host). Without a hostfile the launch is one
      node on `--master_addr 127.0.0.1`; DeepSpeed's default `/job/hostfile`, where one exists, would still add
      its hosts, which cannot reach that address: pass it as `hostfile` for a multi-node run. The module gets
      `--local_rank=<n>`.

    torch's TCPStore server listens on every interface whatever address it is given (torch 2.13), so a
    single-node launch runs the process that hosts it (torchrun's launcher; DeepSpeed's rank 0) through
    `leanpo_core.loopback_store`, which binds the store to 127.0.0.1 first: nothing the launch opens listens
    beyond loopback. A multi-node launch (a hostfile) needs the store reachable and is run as it is.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    if launcher == "python":
        if nproc_per_node != 1 or hostfile:
            raise ValueError("launcher 'python' runs one process on one node: use 'torchrun' or 'deepspeed'")
        return [sys.executable, "-m", module, *args]
    if launcher == "torchrun":
        if hostfile:
            raise ValueError("a hostfile is for launcher 'deepspeed'; torchrun runs on each node with a rendezvous")
        port = str(master_port or free_port())
        return [sys.executable, "-m", LOOPBACK_STORE, "--port", port, "torch.distributed.run",
                "--master_addr", "127.0.0.1", "--master_port", port, "--local-addr", "127.0.0.1",
                "--nproc_per_node", str(nproc_per_node), "--tee", "3", "-m", module, *args]
    nodes = ["--hostfile", hostfile] if hostfile else ["--master_addr", "127.0.0.1"]
    shim = [] if hostfile else [LOOPBACK_STORE]
    return [sys.executable, "-m", "deepspeed.launcher.runner", *nodes, "--num_gpus", str(nproc_per_node),
            "--master_port", str(master_port or free_port()), "--module", *shim, module, *args]


def run_module(module: str, args: Sequence[str] = (), *, launcher: str = "python", nproc_per_node: int = 1,
               hostfile: str | None = None, master_port: int | None = None, **kwargs) -> None:
    """`run` for `python -m module args...` with this interpreter (so the child sees the same environment), or under
    a distributed launcher (`distributed_command`)."""
    env = {**os.environ, **(kwargs.pop("env", None) or {})}
    cmd = distributed_command(module, args, nproc_per_node=nproc_per_node, launcher=launcher, hostfile=hostfile,
                              master_port=master_port)
    run(cmd, env=env, **kwargs)


PARENT_PID_ENV = "LEANPO_LAUNCHER_PID"


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _die_with_launcher(poll_s: float = 1.0) -> None:
    """Kill this process group when the process that launched it (`run`) is gone.

    A SIGKILLed orchestrator (a Prefect worker and its flow-run process killed together) cannot kill the group it
    started in a new session; without this the stage (a vLLM engine, every training rank) would run on as an
    orphan, writing the table a re-run is writing too.
    """
    pid = os.environ.get(PARENT_PID_ENV)
    if not pid or not pid.isdigit() or int(pid) == os.getpid():
        return

    def watch() -> None:
        while _alive(int(pid)):
            time.sleep(poll_s)
        try:  # the launcher read our output: the pipe is most likely broken now
            print(f"leanpo: the launcher (pid {pid}) is gone; stopping this process group", file=sys.stderr,
                  flush=True)
        except (OSError, ValueError):
            pass
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-launcher", daemon=True).start()


# The one rule for "bad input, never retry", in a stage process (exit EXIT_BAD_INPUT) and in a Prefect task
# (tasks.common.transient_only) alike: the same input and config fail the same way again. ValueError covers
# ConfigError, SchemaMismatch, ManifestError and pydantic's ValidationError; FileNotFoundError a missing input (a
# StorageError, an unreachable store, is an OSError but not this one: it is retried).
DETERMINISTIC = (ValueError, TypeError, KeyError, FileNotFoundError)


class BadInput(ValueError):
    """Input or config that is wrong as given (ConfigError, SchemaMismatch, ManifestError derive from it): a stage
    says so in one line, without a traceback, and exits EXIT_BAD_INPUT; nothing retries it."""


def stage_entry(main: Callable[[], Any], hard_exit: bool = False) -> None:
    """Run a stage's CLI `main()`; a deterministic failure (DETERMINISTIC) exits EXIT_BAD_INPUT.

    An invalid config (ConfigError, pydantic's ValidationError), a table that does not match its schema
    (SchemaMismatch), an invalid manifest (ManifestError) or a missing input (FileNotFoundError) is told in one line
    on stderr; another deterministic error (a ValueError such as "no kept pairs", a TypeError) keeps its traceback.
    Anything else propagates with its traceback (exit 1), and the orchestrator may retry it. Every
    `python -m leanpo_core.<stage>` ends in this. Started by `run`, the stage (and each rank) also stops its whole
    process group when the launching process is gone.

    hard_exit: after `main()` returns or fails on bad input, flush stdout/stderr and end with `os._exit` (0 or
    EXIT_BAD_INPUT), skipping interpreter teardown. For stages whose every output is already committed (io's fsync +
    rename) when `main` returns and that hold no engine or process group (training leaves its group before): pyarrow's
    thread pools race at interpreter exit ("terminate called without an active exception", SIGABRT) in 3-4 of 40 runs
    of the pairs stage on the 2-core VM, after its table was written, once in a CI run of `leanpo_core.export` after
    its one-line refusal, and once in a CI run's training rank 1 after its report.
    """
    from pydantic import ValidationError

    _die_with_launcher()
    try:
        main()
        if hard_exit:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except DETERMINISTIC as exc:
        if not isinstance(exc, (BadInput, ValidationError, FileNotFoundError)):
            traceback.print_exc()
        text = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        stage = spec.name if spec else os.path.basename(sys.argv[0])
        print(f"{stage}: bad input: {type(exc).__name__}: {text}", file=sys.stderr, flush=True)
        if hard_exit:
            sys.stdout.flush()
            os._exit(EXIT_BAD_INPUT)
        sys.exit(EXIT_BAD_INPUT)
