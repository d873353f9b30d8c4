"""The Prefect UI of the test server, rendered by headless Chromium: deployments, the data-refresh run, its artifacts.

The UI is a JavaScript app served by the Prefect server: each page is loaded in Debian's `chromium`
(`--headless --dump-dom --screenshot`), given virtual time to fetch from the API and render, and the rendered DOM is
searched for the names. Screenshots land in the test's tmp folder (the path is printed). `setup/env.sh` installs
chromium for the CPU target; without it these tests fail, they never skip.
"""

import html
import json
import re
import shutil
import subprocess

import pytest

from tests.flows.test_deployments import DEPLOYMENTS


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
