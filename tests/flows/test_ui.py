"""The Prefect UI of the test server, rendered by headless Chromium: deployments, the data-refresh run, its artifacts;
and the UI of `leanpo server` on a port other than 4200, which must call its own API, not one on 4200.

The UI is a JavaScript app served by the Prefect server: each page is loaded in Debian's `chromium`
(`--headless --dump-dom --screenshot`), given virtual time to fetch from the API and render, and the rendered DOM is
searched for the names. Screenshots land in the test's tmp folder (the path is printed). `setup/env.sh` installs
chromium for the CPU target; without it these tests fail, they never skip.
"""

import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from flows import cli
from tests.flows.conftest import free_port, stop, wait_healthy
from tests.flows.test_deployments import DEPLOYMENTS

LEANPO = str(Path(sys.executable).with_name("leanpo"))  # the installed entry point


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("the UI tests need Debian's `chromium` on PATH: run `bash setup/env.sh` as root (it installs it "
                    "when missing) or `apt-get install -y --no-install-recommends chromium`")
    return path


def render(url: str, screenshot, budget_ms: int = 20000) -> str:
    """The DOM of `url` after `budget_ms` of virtual time (network replies are awaited within it); a screenshot."""
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         f"--user-data-dir={screenshot.parent / 'chromium-profile'}", "--window-size=1440,1000",
         f"--virtual-time-budget={budget_ms}", f"--screenshot={screenshot}", "--dump-dom", url],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and screenshot.exists(), f"chromium failed on {url}:\n{proc.stderr[-3000:]}"
    print(f"\nscreenshot of {url}: {screenshot}")
    return proc.stdout


def words(dom: str) -> str:
    """The page's text: tags dropped, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("ui-screenshots")


def test_deployments_page_lists_every_deployment(prefect_stack, shots):
    text = words(render(f"{prefect_stack.url}/deployments", shots / "deployments.png"))
    missing = [name for _, name in DEPLOYMENTS if name not in text]
    assert not missing, f"not on the deployments page: {missing} (see {shots / 'deployments.png'})"


def test_completed_flow_run_page_renders(prefect_stack, refresh_run, shots):
    text = words(render(f"{prefect_stack.url}/runs/flow-run/{refresh_run['id']}", shots / "flow-run.png"))
    for expected in (refresh_run["name"], "Completed", "Flow data-refresh", "Deployment data-refresh",
                     "Work Pool leanpo-local", "Artifacts"):
        assert expected in text, f"{expected!r} not on the run page (see {shots / 'flow-run.png'})"


def test_flow_run_artifacts_render(prefect_stack, refresh_run, shots):
    """The pairs table's link artifact and its first-rows table, each on its artifact page."""
    artifacts = {a["key"]: a for a in prefect_stack.api("POST", "/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [refresh_run["id"]]}}})}
    link, first_rows = artifacts["pairs-table"], artifacts["pairs-sample"]
    text = words(render(f"{prefect_stack.url}/artifacts/artifact/{link['id']}", shots / "pairs-table.png"))
    assert "pairs-table" in text and f"{prefect_stack.root}/pairs.parquet" in text and refresh_run["name"] in text, \
        f"see {shots / 'pairs-table.png'}"
    text = words(render(f"{prefect_stack.url}/artifacts/artifact/{first_rows['id']}", shots / "pairs-sample.png"))
    for column in ("pairs-sample", "pair_id", "prompt", "chosen", "rejected"):
        assert column in text, f"{column!r} not on the pairs-sample artifact page (see {shots / 'pairs-sample.png'})"
    assert json.loads(first_rows["data"])[0]["pair_id"] in text  # a row, not only the header


def _post(api: httpx.Client, path: str, body: dict) -> dict:
    """POST as Prefect's own client does: a 503 (the server's database busy, e.g. on a loaded machine) is retried."""
    for attempt in range(5):
        response = api.post(path, json=body)
        if response.status_code != 503:
            break
        time.sleep(2 * (attempt + 1))
    return response.raise_for_status().json()


def test_leanpo_server_ui_calls_its_own_port(tmp_path, shots):
    """`leanpo server --port P` (P not 4200): the UI's settings name P, and a flow run that exists only in this
    server's fresh database renders on its page, so the browser reached the API on P (a server on 4200, if any, has
    another database: the name could not render from there)."""
    port = free_port()
    assert port != 4200
    url = f"http://127.0.0.1:{port}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = tmp_path / "server.log"
    with open(log, "ab") as out:
        server = subprocess.Popen([LEANPO, "server", "--port", str(port)], cwd=tmp_path, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(url, server, log)
        assert httpx.get(f"{url}/ui-settings", timeout=30).json()["api_url"] == f"{url}/api"
        with httpx.Client(base_url=f"{url}/api", timeout=60) as api:
            flow = _post(api, "/flows/", {"name": "port-check"})
            name = f"port-{port}-{uuid.uuid4().hex[:8]}"
            run = _post(api, "/flow_runs/", {"flow_id": flow["id"], "name": name, "state": {
                "type": "COMPLETED", "name": "Completed"}})
        text = words(render(f"{url}/runs/flow-run/{run['id']}", shots / "own-port-flow-run.png"))
        assert "Can't connect" not in text, f"the UI did not reach its API (see {shots / 'own-port-flow-run.png'})"
        assert name in text and "Completed" in text, f"{name!r} not on its page (see {shots / 'own-port-flow-run.png'})"
    finally:
        stop(server)


def test_server_binds_only_loopback_unless_allowed(monkeypatch, capsys):
    """A host that is not loopback: exit 2 naming --allow-remote, or with it a warning, then the server. Nothing is
    bound: the server itself is replaced."""
    started = []
    monkeypatch.setattr(cli, "start_server", lambda port, host: started.append((host, port)) or 0)
    with pytest.raises(SystemExit) as refused:
        cli.main(["server", "--host", "0.0.0.0", "--port", "4377"])
    assert refused.value.code == 2 and not started
    assert "--allow-remote" in capsys.readouterr().err
    assert cli.main(["server", "--host", "0.0.0.0", "--port", "4377", "--allow-remote"]) == 0
    assert started == [("0.0.0.0", 4377)] and "WARNING" in capsys.readouterr().err
    assert cli.main(["server", "--host", "localhost"]) == 0
    assert started[-1] == ("localhost", 4200) and capsys.readouterr().err == ""
    for host in ("127.0.0.1", "::1", "localhost"):
        assert cli.remote_warning(host, 4200) is None
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        assert "no authentication" in cli.remote_warning(host, 4200)


def test_server_tells_the_ui_its_own_host_and_port(monkeypatch):
    """The `prefect server start` child gets PREFECT_UI_API_URL on the same host and port (4200 by default; a
    wildcard host by loopback), unless the user set one."""
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command, env: calls.append((command, env)) or 0)
    monkeypatch.delenv("PREFECT_UI_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_UI_API_URL", raising=False)
    cli.start_server(4200)
    cli.start_server(4377, "0.0.0.0")
    monkeypatch.setenv("PREFECT_UI_API_URL", "https://prefect.example/api")
    cli.start_server(4377)
    assert [command[-4:] for command, _ in calls] == [["--host", "127.0.0.1", "--port", "4200"],
                                                       ["--host", "0.0.0.0", "--port", "4377"],
                                                       ["--host", "127.0.0.1", "--port", "4377"]]
    assert [env["PREFECT_UI_API_URL"] for _, env in calls] == [
        "http://127.0.0.1:4200/api", "http://127.0.0.1:4377/api", "https://prefect.example/api"]
