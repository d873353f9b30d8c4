"""A real Prefect stack for the deployment and UI tests, shared by both (session fixtures).

`prefect_stack`: a `prefect server start` process on a free 127.0.0.1 port with its own PREFECT_HOME, the process
work pool `leanpo-local`, and `prefect --no-prompt deploy --all` run from the repository root with the env
templates of prefect.yaml pointing at a toy model and a synthetic manifest (a few clips).
`refresh_run`: one run of the `data-refresh` deployment, created through the REST route the UI's Run button uses,
executed by a real `prefect worker` process, waited for (bounded).

The server's scheduler service is off: the schedule test asks the server to schedule runs a month ahead instead
(the same code path), so no nightly run can come due while the tests run. Every process is started in its own
session and stopped by its process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

# The smallest data refresh that exercises every stage: a "Custom run" of the deployment with these settings.
# The transformers backend: no vLLM engine to start twice (vLLM itself is run by the demo test and the stage tests).
SMALL_RUN = {
    "frames": {"num_frames": 4, "max_side": 64},
    "reflect": {"judge_max_tokens": 4, "backend": "transformers"},
}
SMALL_SAMPLE = {"num_candidates": 1, "max_new_tokens": 8, "max_model_len": 512, "backend": "transformers"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} is missing)"


def stop(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the process group we started, then SIGKILL it (a `prefect worker` may ignore the first SIGTERM)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
    try:  # children left behind by a leader that exited (flow-run engines, vLLM workers)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class PrefectStack:
    url: str  # the server (UI at `/`, REST API at `/api`)
    env: dict  # what a Prefect client process needs: PREFECT_API_URL and PREFECT_HOME
    workdir: Path
    model: str
    manifest: str
    root: str
    deploy_output: str = ""
    http: httpx.Client = field(init=False)

    def __post_init__(self):
        self.http = httpx.Client(base_url=f"{self.url}/api", timeout=60)

    def prefect(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the `prefect` CLI against this server from the repository root."""
        proc = subprocess.run([PREFECT, *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def api(self, method: str, path: str, hint: str = "", **kwargs):
        """A REST call. Like Prefect's own client, a few retries on 503 and timeouts: SQLite keeps the server busy
        when the machine is loaded."""
        for attempt in range(6):
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TimeoutException:
                if attempt == 5:
                    raise
                continue
            if response.status_code != 503:
                break
            time.sleep(1 + attempt)
        assert response.is_success, (f"{method} {path}: {response.status_code} {response.text[:2000]} {hint} "
                                     f"(server log: {self.workdir / 'server.log'})")
        return response.json() if response.content else None

    def deployment(self, flow: str, name: str) -> dict:
        return self.api("GET", f"/deployments/name/{flow}/{name}")

    def start(self, *args: str, log: str) -> subprocess.Popen:
        with open(self.workdir / log, "ab") as out:
            return subprocess.Popen([PREFECT, *args], cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)


def wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited with {server.returncode}:\n{tail(log)}"
        try:
            if httpx.get(f"{url}/api/health", timeout=5).json() is True:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    pytest.fail(f"prefect server not healthy after {timeout_s:.0f} s:\n{tail(log)}")


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory):
    from leanpo_core import synthetic, toy

    workdir = tmp_path_factory.mktemp("prefect-stack")
    model = str(toy.build_toy_model("qwen2_vl", workdir / "model"))
    manifest = str(synthetic.generate(workdir / "synthetic", num=4, seed=0, questions_per_clip=1))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    home = {"PREFECT_HOME": str(workdir / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    # The UI asks the server where the API is: without PREFECT_UI_API_URL it would say port 4200.
    server_env = {**base, **home, "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
                  "PREFECT_UI_API_URL": f"{url}/api", "PREFECT_API_LOG_RETRYABLE_ERRORS": "true"}
    client_env = {**base, **home, "PREFECT_API_URL": f"{url}/api",
                  "LEANPO_REPO_DIR": str(REPO), "LEANPO_MANIFEST": manifest,
                  "LEANPO_DATA_ROOT": str(workdir / "round-0"), "LEANPO_MODEL": model}
    stack = PrefectStack(url=url, env=client_env, workdir=workdir, model=model, manifest=manifest,
                         root=str(workdir / "round-0"))
    log = workdir / "server.log"
    with open(log, "ab") as out:
        server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  cwd=workdir, env=server_env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(url, server, log)
        stack.prefect("work-pool", "create", "leanpo-local", "--type", "process")
        stack.deploy_output = stack.prefect("--no-prompt", "deploy", "--all", timeout=600).stdout
        print(f"\nPrefect stack: {url} (UI), logs and tables under {workdir}")
        yield stack
    finally:
        stack.http.close()
        stop(server)


@pytest.fixture(scope="session")
def refresh_run(prefect_stack):
    """One completed (or failed: the tests say why) run of the `data-refresh` deployment, small settings."""
    stack = prefect_stack
    deployment = stack.deployment("data-refresh", "data-refresh")
    parameters = {**SMALL_RUN, "sample": {**deployment["parameters"]["sample"], **SMALL_SAMPLE}}
    # The idempotency key makes a retried request return the same run instead of a second one.
    flow_run = stack.api("POST", f"/deployments/{deployment['id']}/create_flow_run",
                         json={"parameters": parameters, "idempotency_key": f"refresh-run-{uuid.uuid4()}"})
    # Only the default queue: a retrain that a published-pairs event starts waits on queue "train", unexecuted.
    return run_on_worker(stack, flow_run, timeout_s=600)  # the smallest run takes 1-3 min on 2 busy cores


def run_on_worker(stack: PrefectStack, flow_run: dict, timeout_s: float) -> dict:
    """Start a `prefect worker` on the pool's default queue, wait (bounded) until `flow_run` ends, stop the worker;
    the run as the server has it then, with the worker's log tail in `worker_log`."""
    worker = stack.start("worker", "start", "--pool", "leanpo-local", "--work-queue", "default",
                         log="worker.log")
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            flow_run = stack.api("GET", f"/flow_runs/{flow_run['id']}")
            if flow_run["state"]["type"] in TERMINAL:
                break
            assert worker.poll() is None, f"the worker exited:\n{tail(stack.workdir / 'worker.log')}"
            time.sleep(2)
    finally:
        stop(worker)
    flow_run["worker_log"] = tail(stack.workdir / "worker.log", 6000)
    return flow_run
