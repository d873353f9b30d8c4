"""prefect.yaml against a real Prefect server: `prefect deploy --all`, a worker running the data refresh, schedules,
the retrain trigger, and the Kubernetes GPU work-pool template (stack in tests/flows/conftest.py)."""

import json
import re
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import yaml

from leanpo_core import io, schemas
from tests.flows.conftest import run_on_worker

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENTS = {("data-refresh", "data-refresh-nightly"), ("data-refresh", "data-refresh"), ("train", "retrain"),
               ("pipeline", "pipeline"), ("export", "export-on-promotion")}
TABLES = {"videos-table": schemas.VIDEOS, "frames-table": schemas.FRAMES, "samples-table": schemas.SAMPLES,
          "scored-table": schemas.SCORED, "pairs-table": schemas.PAIRS}


def spec(name: str) -> dict:
    return next(d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"] if d["name"] == name)


def scheduled_runs(stack, deployment: dict, runs: int) -> list[datetime]:
    """Ask the server to schedule `runs` runs a month ahead (the scheduler service's code path); their start times."""
    start = datetime.now(timezone.utc) + timedelta(days=30)
    stack.api("POST", f"/deployments/{deployment['id']}/schedule",
              json={"start_time": start.isoformat(), "min_runs": runs, "max_runs": runs},
              hint="- the server cannot insert scheduled runs; Prefect 3.7.7 with SQLAlchemy 2.1 fails exactly here "
                   "(InvalidRequestError: Can't evaluate bulk DML statement): pin sqlalchemy<2.1")
    found = stack.api("POST", "/flow_runs/filter", json={
        "deployments": {"id": {"any_": [deployment["id"]]}},
        "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}, "expected_start_time": {"after_": start.isoformat()}},
        "sort": "EXPECTED_START_TIME_ASC"})
    return [datetime.fromisoformat(run["expected_start_time"]) for run in found]


def test_deploy_all_registers_every_deployment_on_the_local_pool(prefect_stack):
    names = {d["name"] for d in prefect_stack.api("POST", "/deployments/filter", json={})}
    assert names == {name for _, name in DEPLOYMENTS}, prefect_stack.deploy_output[-2000:]
    for flow, name in DEPLOYMENTS:
        deployment = prefect_stack.deployment(flow, name)
        assert deployment["work_pool_name"] == "leanpo-local"
        assert deployment["entrypoint"] == spec(name)["entrypoint"]
    retrain = prefect_stack.deployment("train", "retrain")
    assert retrain["global_concurrency_limit"]["limit"] == 1
    assert retrain["work_queue_name"] == "train"
    assert retrain["parameters"]["root"] == prefect_stack.root  # env templates resolved at deploy time
    nightly = prefect_stack.deployment("data-refresh", "data-refresh-nightly")
    assert nightly["parameters"] == {"manifest": prefect_stack.manifest, "root": prefect_stack.root,
                                     "sample": {"model": prefect_stack.model}}


def test_a_run_of_the_data_refresh_deployment_completes_and_links_readable_tables(refresh_run, prefect_stack):
    """The UI's Run button -> a real worker -> a Completed run whose link artifacts open as the run's tables."""
    assert refresh_run["state"]["type"] == "COMPLETED", refresh_run["worker_log"]
    artifacts = prefect_stack.api("POST", "/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [refresh_run["id"]]}}})
    by_key = {a["key"]: a for a in artifacts}
    assert set(TABLES) <= set(by_key), sorted(by_key)
    rows = {}
    for key, table_spec in TABLES.items():
        link = re.search(r"\]\((.+?)\)", by_key[key]["data"]).group(1)  # link artifacts come back as markdown
        uri = link.removeprefix("file://")
        assert uri.startswith(prefect_stack.root), uri
        table = io.read_table(uri, table_spec) if uri.endswith(".parquet") else io.read_dataset(uri, table_spec)
        rows[key] = table.num_rows
        assert str(table.num_rows) in by_key[key]["description"]
        assert by_key[key.replace("-table", "-sample")]["type"] == "table"
    assert rows["videos-table"] > 0
    assert rows["pairs-table"] == rows["videos-table"] == rows["frames-table"]  # one question per clip
    assert rows["samples-table"] == rows["scored-table"] == 2 * rows["videos-table"]  # 1 candidate x 2 sides


def retrain_runs(stack, root: str, timeout_s: float = 120) -> list[dict]:
    """Runs of the retrain deployment on `root`, waited for: the triggers and actions services are asynchronous."""
    retrain = stack.deployment("train", "retrain")
    deadline = time.monotonic() + timeout_s
    while True:
        found = stack.api("POST", "/flow_runs/filter", json={"deployments": {"id": {"any_": [retrain["id"]]}}})
        runs = [r for r in found if r["parameters"].get("root") == root]
        if runs or time.monotonic() > deadline:
            return runs
        time.sleep(1)


def test_the_refresh_run_queues_a_retrain_of_its_root(refresh_run, prefect_stack):
    """data refresh -> `leanpo.pairs.published` -> the retrain trigger -> a retrain run on the refreshed root."""
    assert refresh_run["state"]["type"] == "COMPLETED", refresh_run["worker_log"]
    runs = retrain_runs(prefect_stack, prefect_stack.root)
    assert len(runs) == 1, "no retrain run within 120 s of the data refresh"
    assert runs[0]["work_queue_name"] == "train" and runs[0]["state"]["type"] == "SCHEDULED"
    prefect_stack.api("DELETE", f"/flow_runs/{runs[0]['id']}")  # nobody serves queue "train" here


def test_schedules_fall_at_their_cron_time_in_their_timezone(prefect_stack):
    nightly = prefect_stack.deployment("data-refresh", "data-refresh-nightly")
    (schedule,) = nightly["schedules"]
    declared = spec("data-refresh-nightly")["schedules"][0]
    assert schedule["active"] and schedule["schedule"]["cron"] == declared["cron"] == "0 2 * * *"
    zone = ZoneInfo(schedule["schedule"]["timezone"])
    assert schedule["schedule"]["timezone"] == declared["timezone"]
    starts = [t.astimezone(zone) for t in scheduled_runs(prefect_stack, nightly, 3)]
    assert len(starts) == 3 and all((t.hour, t.minute) == (2, 0) for t in starts), starts
    assert [(b.date() - a.date()).days for a, b in zip(starts, starts[1:])] == [1, 1]

    retrain = prefect_stack.deployment("train", "retrain")
    (schedule,) = retrain["schedules"]
    declared = spec("retrain")["schedules"][0]
    assert schedule["schedule"]["cron"] == declared["cron"] and schedule["schedule"]["timezone"] == declared["timezone"]
    zone = ZoneInfo(declared["timezone"])
    starts = [t.astimezone(zone) for t in scheduled_runs(prefect_stack, retrain, 2)]
    assert len(starts) == 2 and all((t.isoweekday(), t.hour, t.minute) == (7, 6, 0) for t in starts), starts


def test_published_pairs_event_starts_a_retrain_on_that_root(prefect_stack):
    """The retrain trigger is an automation on `leanpo.pairs.published`; an event starts a run with its root."""
    retrain = prefect_stack.deployment("train", "retrain")
    automations = prefect_stack.api("GET", f"/automations/related-to/prefect.deployment.{retrain['id']}")
    (automation,) = automations
    trigger, (action,) = automation["trigger"], automation["actions"]
    assert automation["enabled"] and trigger["type"] == "event" and trigger["posture"] == "Reactive"
    assert trigger["expect"] == ["leanpo.pairs.published"]
    assert trigger["match"] == {"prefect.resource.id": "leanpo.pairs.*"}
    assert action["type"] == "run-deployment" and action["deployment_id"] == retrain["id"]
    assert action["parameters"] == {"root": "{{ event.payload.root }}"}

    root = f"{prefect_stack.workdir}/round-{uuid.uuid4().hex[:6]}"
    prefect_stack.api("POST", "/events", json=[{
        "id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(),
        "event": "leanpo.pairs.published", "resource": {"prefect.resource.id": f"leanpo.pairs.{root}"},
        "payload": {"root": root, "uri": f"{root}/pairs.parquet", "rows": 3, "kept": 2}}])  # as tasks.data emits
    runs = retrain_runs(prefect_stack, root)
    assert runs, "no retrain run within 120 s of the event"
    run = runs[0]
    assert run["parameters"]["train"] == retrain["parameters"]["train"]  # the deployment's settings are kept
    assert run["work_queue_name"] == "train"
    for run in runs:  # nobody serves queue "train" here; leave no backlog
        prefect_stack.api("DELETE", f"/flow_runs/{run['id']}")


def test_kubernetes_gpu_job_template_is_a_valid_base_job_template(prefect_stack):
    """The server accepts it for a kubernetes pool, and it renders with the variables' defaults into a GPU Job."""
    from prefect.utilities.templating import apply_values

    path = REPO / "deployments" / "k8s-gpu-job-template.json"
    template = json.loads(path.read_text())
    # What `prefect work-pool create leanpo-k8s-gpu --type kubernetes --base-job-template FILE` sends
    prefect_stack.api("POST", "/work_pools/", json={"name": "leanpo-k8s-gpu", "type": "kubernetes",
                                                     "base_job_template": template})
    pool = prefect_stack.api("GET", "/work_pools/leanpo-k8s-gpu")
    assert pool["type"] == "kubernetes" and pool["base_job_template"] == template
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    rendered = apply_values(template["job_configuration"], defaults)  # what the worker does before adding its own
    job = rendered["job_manifest"]
    assert job["kind"] == "Job" and job["apiVersion"] == "batch/v1"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == defaults["gpus"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_the_server_rejects_a_job_template_whose_variables_are_undeclared(prefect_stack):
    """The check the GPU template passes is a real one: drop the `gpus` variable and the server refuses the pool."""
    template = json.loads((REPO / "deployments" / "k8s-gpu-job-template.json").read_text())
    del template["variables"]["properties"]["gpus"]
    response = prefect_stack.http.post("/work_pools/", json={"name": "leanpo-k8s-broken", "type": "kubernetes",
                                                              "base_job_template": template})
    assert response.status_code == 422 and "gpus" in response.text, response.text


def waited_runs(stack, deployment: dict, where, timeout_s: float = 120) -> list[dict]:
    """Runs of `deployment` for which `where(run)` holds, waited for (the triggers service is asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = stack.api("POST", "/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment["id"]]}}})
        runs = [r for r in found if where(r)]
        if runs or time.monotonic() > deadline:
            return runs
        time.sleep(1)


def test_a_promotion_event_exports_the_promoted_model(prefect_stack):
    """The gate's `leanpo.model.promoted` event -> export-on-promotion -> a real worker copies the model into the
    serving folder and points current.json at it."""
    from leanpo_core.export import read_pointer
    from leanpo_core.registry import Registry

    registry = Registry(str(prefect_stack.workdir / f"registry-{uuid.uuid4().hex[:6]}"))
    registry.register("m1", prefect_stack.model, base_model="sft", reason="trained by the test")
    registry.promote("production", "m1", "beats sft by 2 pp")
    prefect_stack.api("POST", "/events", json=[{  # as tasks.gate emits it
        "id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(),
        "event": "leanpo.model.promoted",
        "resource": {"prefect.resource.id": "leanpo.model.production", "prefect.resource.name": "m1"},
        "payload": {"model_id": "m1", "alias": "production", "registry": registry.uri,
                    "model_uri": registry.get("m1")["model_uri"], "previous_model_id": None,
                    "reason": "beats sft by 2 pp", "evaluation": None}}])
    export = prefect_stack.deployment("export", "export-on-promotion")
    runs = waited_runs(prefect_stack, export, lambda r: r["parameters"].get("registry") == registry.uri)
    assert len(runs) == 1, "no export run within 120 s of the event"
    assert runs[0]["parameters"] == {"registry": registry.uri, "alias": "production", "model_id": "m1"}
    finished = run_on_worker(prefect_stack, runs[0], timeout_s=300)
    assert finished["state"]["type"] == "COMPLETED", finished["worker_log"]
    pointer = read_pointer(f"{registry.uri}/serving/production")
    assert pointer["model_id"] == "m1" and pointer["reason"] == "beats sft by 2 pp"
    assert (Path(pointer["path"]) / "config.json").read_bytes() == (Path(prefect_stack.model) / "config.json").read_bytes()


def test_leanpo_serve_builds_the_deployments_prefect_yaml_declares(prefect_stack):
    """One definition: the deployments `leanpo serve` builds (flows/deployments.py) have the names, descriptions,
    tags, parameters, schedules, triggers and concurrency limits that `prefect deploy --all` registered."""
    from flows.cli import FLOWS, load_flow
    from flows.deployments import runner_deployments

    served, notes = runner_deployments({}, FLOWS, load_flow, environ=prefect_stack.env)
    assert notes == []  # the environment gives every schedule its parameters
    assert {(d.flow_name, d.name) for d in served} == {(load_flow(f).name, n) for f, n in DEPLOYMENTS}
    for d in served:
        remote = prefect_stack.deployment(d.flow_name, d.name)
        assert remote["parameters"] == d.parameters, d.name
        assert remote["description"] == d.description and sorted(remote["tags"]) == sorted(d.tags), d.name
        assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in remote["schedules"]] == \
            [(s.schedule.cron, s.schedule.timezone, s.active) for s in d.schedules], d.name
        limit = remote["global_concurrency_limit"]
        assert (limit["limit"] if limit else None) == d.concurrency_limit, d.name
        automations = prefect_stack.api("GET", f"/automations/related-to/prefect.deployment.{remote['id']}")
        declared = [t.model_dump(mode="json") for t in d.triggers]
        assert len(automations) == len(declared), d.name
        for automation, trigger in zip(automations, declared):
            (action,) = automation["actions"]
            assert action["parameters"] == trigger["parameters"], d.name
            for key in ("expect", "match", "posture", "threshold", "within"):
                assert automation["trigger"][key] == trigger[key], (d.name, key)
