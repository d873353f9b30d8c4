"""leanpo_core.registry on a local folder and on a real SeaweedFS S3 server: lineage, promote / reject / rollback,
clear refusals, and SIGKILL in the middle of a promotion leaving the registry before or after it, never between.

The kill tests stop a child promotion at chosen points inside its one write (locally: the event's bytes written and
fsynced but not yet renamed; on S3: the PUT cut off by a proxy after half its body, so the server holds a truncated
upload; on both: the event published but not its manifest) and at random moments of a loop of promotions.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from leanpo_core import io, schemas
from leanpo_core.config import TrainConfig
from leanpo_core.io import StorageError, StorageOptions
from leanpo_core.layout import RunLayout
from leanpo_core.registry import Registry, RegistryError, replay
from leanpo_core.registry_cli import cli
from tests.leanpo_core.test_io import sample_rows

REPO = Path(__file__).resolve().parents[2]
ALIAS = "production"


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_root")


def model_folder(where: Path, name: str) -> str:
    folder = where / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "name": name}))
    (folder / "model.safetensors").write_bytes(os.urandom(1024))
    return str(folder)


def lineage_tables(root: str) -> dict:
    """A pairs table, a train_metrics table and an evaluation table (trained model first, then its baseline)."""
    pairs = io.write_table(sample_rows(schemas.PAIRS, 3), RunLayout(root).pairs, schemas.PAIRS)
    metrics = io.join_uri(root, "train", "r1", "metrics.parquet")
    io.write_table([dict(run_id="r1", step=step, epoch=step / 4, loss=1.0 / step) for step in (1, 2, 4)], metrics,
                   schemas.TRAIN_METRICS)
    evaluation = RunLayout(root).evaluation("r1")
    io.write_table([dict(run_id="r1", model=model, split="test", metric="answer_accuracy", value=value, n=491,
                         ci_low=value - 0.04, ci_high=value + 0.04, details=None)
                    for model, value in (("trained", 0.70), ("sft", 0.686))], evaluation, schemas.EVALUATION)
    return {"pairs": pairs, "metrics": metrics, "evaluation": evaluation}


def test_lineage_promote_reject_rollback(root, tmp_path):
    registry = Registry(RunLayout(root).registry)
    tables = lineage_tables(root)
    a = registry.register("a", model_folder(tmp_path, "a"), base_model="sft", objective="leanpo", run_id="r1",
                          pairs_uri=tables["pairs"].uri, config_hash="cfg0", round=0,
                          metrics_uri=tables["metrics"], evaluation_uri=tables["evaluation"], by="trainer@gpu1")
    assert a["pairs_hash"] == tables["pairs"].content_hash and a["config_hash"] == "cfg0" and a["round"] == 0
    assert (a["steps"], a["final_loss"]) == (4, 0.25) and a["base_model"] == "sft"
    assert a["evaluation"]["answer_accuracy"]["value"] == 0.70 and a["evaluation"]["answer_accuracy"]["n"] == 491
    assert a["registered_by"] == "trainer@gpu1" and a["status"] == "registered"
    assert registry.current(ALIAS) is None

    promoted = registry.promote(ALIAS, "a", "first model", by="alice@ops")
    assert registry.current(ALIAS)["model_id"] == "a"
    assert (promoted["event"], promoted["created_by"], promoted["reason"]) == ("promoted", "alice@ops", "first model")
    assert promoted["previous_model_id"] is None

    # A rejected candidate stays, with its reason; current is untouched and it cannot be promoted.
    registry.register("b", model_folder(tmp_path, "b"), base_model="a", copy=True)
    registry.reject("b", "answer accuracy -4.9 pp [-7.7, -2.0]", by="gate@retrain", alias=ALIAS)
    state = registry.state()
    assert state.current == {ALIAS: "a"} and state.models["b"]["status"] == "rejected"
    assert state.models["b"]["rejected"]["reason"].startswith("answer accuracy -4.9 pp")
    with pytest.raises(RegistryError, match="was rejected"):
        registry.promote(ALIAS, "b", "try anyway")
    # copy=True: the registry owns a copy of the folder
    copied = registry.get("b")["model_uri"]
    assert copied == registry.model_folder("b") and io.exists(io.join_uri(copied, "config.json"))
    assert json.loads(io.read_bytes(io.join_uri(copied, "config.json")))["name"] == "b"

    registry.register("c", model_folder(tmp_path, "c"), base_model="a")
    registry.promote(ALIAS, "c", "beats a")
    assert registry.current(ALIAS)["model_id"] == "c" and registry.get("a")["status"] == "registered"
    rolled = registry.rollback(ALIAS, "regression in production", by="bob@ops")
    assert (rolled["event"], rolled["model_id"], rolled["previous_model_id"]) == ("rolled_back", "a", "c")
    assert registry.current(ALIAS)["model_id"] == "a"
    with pytest.raises(RegistryError, match="no earlier model"):
        registry.rollback(ALIAS, "again")

    events = registry.history(alias=ALIAS)
    assert [(e["event"], e["model_id"]) for e in events] == [
        ("promoted", "a"), ("rejected", "b"), ("promoted", "c"), ("rolled_back", "a")]
    assert all(e["created_by"] and e["reason"] and e["created_at"] for e in events)


def test_rollback_skips_models_rejected_since_and_aliases_are_independent(tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    for name in "abc":
        registry.register(name, model_folder(tmp_path, name))
    for name in "abc":
        registry.promote(ALIAS, name, f"promote {name}")
    registry.promote("canary", "a", "canary")
    registry.rollback(ALIAS, "c is bad")  # -> b
    registry.reject("c", "bad")
    with pytest.raises(RegistryError, match="is current for production"):
        registry.reject("b", "current")
    registry.promote(ALIAS, "a", "back to a")  # stack a, b, a
    registry.rollback(ALIAS, "a again")  # -> b
    assert registry.state().current == {ALIAS: "b", "canary": "a"}
    registry.promote(ALIAS, "a", "a once more")  # stack a, b, a
    registry.reject("b", "b turned out bad")  # b is not current now; rollback from a must skip it
    assert registry.rollback(ALIAS, "skip b")["model_id"] == "a"
    assert registry.state().current == {ALIAS: "a", "canary": "a"}
    assert replay(registry.events()).current == registry.state().current  # deterministic replay


def test_refusals_are_clear(tmp_path, capsys):
    location = str(tmp_path / "registry")
    registry = Registry(location)
    folder = model_folder(tmp_path, "a")
    registry.register("a", folder)
    count = len(registry.events())
    assert registry.register("a", folder)["model_id"] == "a" and len(registry.events()) == count  # a retried task
    cases = [
        (lambda: registry.register("a", model_folder(tmp_path, "other")), "already registered for"),
        (lambda: registry.register("x", str(tmp_path / "missing")), "does not exist"),
        (lambda: registry.register("../evil", folder), "invalid model id"),
        (lambda: registry.promote(ALIAS, "nope", "why"), "no model 'nope'"),
        (lambda: registry.promote(ALIAS, "a", " "), "needs a reason"),
        (lambda: registry.promote("bad alias", "a", "why"), "invalid alias"),
        (lambda: registry.rollback(ALIAS, "why"), "has no current model"),
        (lambda: registry.reject("nope", "why"), "no model 'nope'"),
    ]
    for call, message in cases:
        with pytest.raises(RegistryError, match=re.escape(message)):
            call()
    assert len(registry.events()) == count
    registry.promote(ALIAS, "a", "first")
    with pytest.raises(RegistryError, match="already current"):
        registry.promote(ALIAS, "a", "again")
    # the CLI: one line, exit 65 (bad input), no traceback
    capsys.readouterr()
    assert cli(["promote", "nope", "--reason", "x", "--registry", location]) == 65
    err = capsys.readouterr().err
    assert err.startswith("leanpo models: no model 'nope'") and "Traceback" not in err and err.count("\n") == 1
    assert cli(["list"]) == 2 and "give --registry URI or --root ROOT" in capsys.readouterr().err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_bucket_is_a_storage_error_naming_it(monkeypatch, capsys):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("LEANPO_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAREGISTRYTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "registry-secret-must-not-leak")
    uri = "s3://leanpo-test/run/registry"
    with pytest.raises(StorageError, match=re.escape(endpoint)):
        Registry(uri, StorageOptions(max_attempts=1)).promote(ALIAS, "a", "why")
    assert cli(["list", "--registry", uri]) == 1
    err = capsys.readouterr().err
    assert uri in err and endpoint in err and "registry-secret" not in err and "Traceback" not in err


# -- SIGKILL in the middle of a promotion ------------------------------------------------------------------------

_CHILD = r"""
import os, sys, time
from pathlib import Path
from leanpo_core import io
from leanpo_core.registry import Registry

uri, marker, mode = sys.argv[1:4]

def stall(*_):
    Path(marker).touch()
    time.sleep(3600)

if mode == "fsync":  # the event's temporary file is written; stop before it is renamed into place
    os.fsync = stall
elif mode == "manifest":  # the event is published; stop before its manifest is written
    real = io._put_atomic
    def put(target, data, options):
        if target.rsplit("/", 1)[-1].startswith("_"):
            stall()
        return real(target, data, options)
    io._put_atomic = put
registry = Registry(uri)
if mode == "loop":  # promote a and b in turn until killed; one line per completed promotion
    with open(marker, "a") as progress:
        while True:
            current = registry.current("production")["model_id"]
            registry.promote("production", "b" if current == "a" else "a", "loop")
            progress.write("done\n")
            progress.flush()
registry.promote("production", "b", "killed mid-write")
print("promotion completed although it should have stalled", file=sys.stderr)
"""


def _child(uri: str, marker: Path, mode: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD, uri, str(marker), mode], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, stderr=subprocess.PIPE)


def _kill_when(child: subprocess.Popen, ready, delay_s: float = 0.0) -> None:
    try:
        deadline = time.monotonic() + 60
        while not ready():
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the child never reached the kill point"
            time.sleep(0.01)
        time.sleep(delay_s)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL


class CuttingProxy:
    """A TCP proxy in front of the S3 server: it forwards everything until a request line contains `needle`, then
    forwards that request's header and half its body, touches `marker`, and forwards nothing more from that client;
    when the client dies the upstream connection is closed, so the server holds a truncated PUT."""

    def __init__(self, upstream_port: int, needle: bytes, marker: Path):
        self.upstream_port, self.needle, self.marker = upstream_port, needle, marker
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.handlers: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            handler = threading.Thread(target=self._serve, args=(client,), daemon=True)
            handler.start()
            self.handlers.append(handler)

    @staticmethod
    def _pump(source: socket.socket, dest: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                dest.sendall(data)
        except OSError:
            pass

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        pending, half = b"", None  # half: body bytes of the matched PUT still to forward
        try:
            while data := client.recv(1 << 16):
                if half == 0:
                    continue  # cut: nothing more reaches the server
                pending += data
                if half is None:
                    start = pending.find(self.needle)
                    end = pending.find(b"\r\n\r\n", start) if start >= 0 else -1
                    if end < 0:  # no match yet (hold back a tail that may begin one), or its header is incomplete
                        keep = len(pending) - start if start >= 0 else next(
                            k for k in range(len(self.needle) - 1, -1, -1) if pending.endswith(self.needle[:k]))
                        upstream.sendall(pending[:len(pending) - keep])
                        pending = pending[len(pending) - keep:]
                        continue
                    # the header goes through at once: the client may wait for "100 Continue" before the body
                    length = re.search(rb"(?im)^content-length:\s*(\d+)", pending[start:end])
                    upstream.sendall(pending[:end + 4])
                    pending, half = pending[end + 4:], int(length.group(1)) // 2
                sent = pending[:half]
                upstream.sendall(sent)
                pending, half = pending[len(sent):], half - len(sent)
                if half == 0:
                    self.marker.touch()
        except OSError:
            pass
        finally:
            for sock in (upstream, client):
                sock.close()

    def close(self) -> None:
        self.server.close()
        for handler in self.handlers:
            handler.join(timeout=10)


def _two_models(root: str, tmp_path: Path) -> Registry:
    registry = Registry(io.join_uri(root, "registry"))
    for name in "ab":
        registry.register(name, model_folder(tmp_path, name))
    registry.promote(ALIAS, "a", "start")
    return registry


@pytest.mark.parametrize("where, mode, expected", [
    ("local", "fsync", "before"), ("s3", "cut", "before"), ("local", "manifest", "after"), ("s3", "manifest", "after"),
])
def test_promotion_killed_inside_its_write_is_before_or_after(where, mode, expected, tmp_path, request):
    root = str(tmp_path / "store") if where == "local" else request.getfixturevalue("s3_root")
    registry = _two_models(root, tmp_path)
    before = registry.events()
    marker, env, proxy = tmp_path / "stalled", {}, None
    if mode == "cut":
        server = request.getfixturevalue("s3_server")
        prefix = io.filesystem(registry.events_uri)[1]
        proxy = CuttingProxy(server.ports["s3"], f"PUT /{prefix}/2".encode(), marker)
        env = {"LEANPO_S3_ENDPOINT_URL": proxy.url, "AWS_ENDPOINT_URL": proxy.url}
    try:
        _kill_when(_child(registry.uri, marker, mode, env), marker.exists)
    finally:
        if proxy:
            proxy.close()

    state = registry.state()  # every stored event reads whole
    if expected == "before":
        assert state.events == before and state.current == {ALIAS: "a"}
    else:
        assert state.events[:-1] == before and state.current == {ALIAS: "b"}
        assert (state.events[-1]["event"], state.events[-1]["reason"]) == ("promoted", "killed mid-write")
    if mode == "fsync":  # the hidden temporary is left; listings skip it
        fs, path = io.filesystem(registry.events_uri)
        assert [p for p in fs.find(path) if Path(p).name.startswith(".")], fs.find(path)
    # the registry goes on from there
    registry.promote(ALIAS, "a" if state.current[ALIAS] == "b" else "b", "after the kill")
    registry.rollback(ALIAS, "and back")
    assert registry.state().current == state.current


def test_random_kills_in_a_loop_of_promotions(root, tmp_path):
    registry = _two_models(root, tmp_path)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for trial in range(2):
        progress = tmp_path / f"progress-{trial}"
        promotions = sum(e["event"] == "promoted" for e in registry.events())
        delay = rng.uniform(0.0, 0.3)
        _kill_when(_child(registry.uri, progress, "loop"), lambda: progress.exists() and progress.stat().st_size,
                   delay)
        completed = progress.read_text().count("done\n")
        state = registry.state()  # every stored event reads whole
        written = [e for e in state.events if e["event"] == "promoted"][promotions:]
        context = f"seed {seed}, trial {trial}, delay {delay:.3f} s: {completed} completed, {len(written)} stored"
        assert len(written) in (completed, completed + 1), context
        assert state.current[ALIAS] == written[-1]["model_id"], context
        assert all(e["previous_model_id"] != e["model_id"] for e in written), context


def test_leanpo_models_list_shows_the_lineage(tmp_path, capsys):
    root = str(tmp_path / "run")
    registry = Registry(RunLayout(root).registry)
    tables = lineage_tables(root)
    registry.register("leanpo-0123456789", model_folder(tmp_path, "m"), base_model="/models/sft",
                      pairs_uri=tables["pairs"].uri, config_hash="cfg0123456789abc", round=2,
                      metrics_uri=tables["metrics"], evaluation_uri=tables["evaluation"])
    registry.promote(ALIAS, "leanpo-0123456789", "first")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "models", "list", "--root", root], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "250"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for text in ("leanpo-0123456789", "current (production)", "/models/sft", tables["pairs"].content_hash[:10],
                 "cfg0123456", "0.2500", "answer_accuracy 0.700 (n=491)", "current: production -> leanpo-01234"):
        assert text in out, out
    assert re.search(r"\b2\s+4\b", out), out  # round 2, 4 steps

    assert cli(["list", "--root", root, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["current"] == {ALIAS: "leanpo-0123456789"}
    assert listed["models"][0]["pairs_hash"] == tables["pairs"].content_hash
    assert cli(["show", "leanpo-0123456789", "--root", root, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [e["event"] for e in shown["events"]] == ["registered", "promoted"] and shown["steps"] == 4
    assert cli(["rollback", "--root", root, "--reason", "x"]) == 65
    assert "no earlier model" in capsys.readouterr().err

    # register from what the train flow publishes (tasks.train.publish's record) and a train.yaml
    published = io.join_uri(root, "train", "r2", "published.json")
    io.write_bytes(published, json.dumps({
        "run_id": "leanpo-r2", "objective": "leanpo", "base_model": "leanpo-0123456789",
        "model": model_folder(tmp_path, "r2"), "metrics": tables["metrics"], "steps": 4, "final_loss": 0.25,
        "evaluation": tables["evaluation"]}).encode())
    (tmp_path / "train.yaml").write_text("model: /models/sft\nbeta: 2.5\n")
    assert cli(["register", "--root", root, "--published", published, "--pairs", tables["pairs"].uri, "--round",
                "3", "--train-config", str(tmp_path / "train.yaml"), "--json"]) == 0
    registered = json.loads(capsys.readouterr().out)
    assert registered["model_id"] == "leanpo-r2" and registered["base_model"] == "leanpo-0123456789"
    assert registered["config_hash"] == TrainConfig(model="/models/sft", beta=2.5).config_hash()
    assert (registered["round"], registered["steps"], registered["objective"]) == (3, 4, "leanpo")
    assert registered["evaluation"]["answer_accuracy"]["value"] == 0.70
    assert cli(["promote", "leanpo-r2", "--root", root, "--reason", "gate passed", "--by", "gate@retrain"]) == 0
    assert "promoted leanpo-r2 to production (was leanpo-0123456789)" in capsys.readouterr().out


def test_module_cli_refuses_bad_input_with_exit_65(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "leanpo_core.registry_cli", "promote", "nope", "--reason", "x",
                           "--registry", str(tmp_path / "registry")], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 65, proc.stderr
    assert "bad input: RegistryError: no model 'nope'" in proc.stderr and "Traceback" not in proc.stderr
