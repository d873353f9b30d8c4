"""The deployments, defined once in prefect.yaml: `prefect deploy --all` reads it for work pools, and `leanpo serve`
builds the same deployments from it to serve in-process (names, descriptions, tags, schedules, triggers,
concurrency limits and parameters; work pools and queues do not apply to a served flow).

A served deployment's parameters are prefect.yaml's, with each `{{ $VAR }}` read from the environment as `prefect
deploy` does (left out when VAR is unset), then the `leanpo serve --config` section of its flow merged over them.
A schedule is served only when its runs would have every required parameter; otherwise the deployment is served
without it (triggers and the UI's run form can still give them) and `served` says why.
"""

from __future__ import annotations

import inspect
import os
import re
import typing
from pathlib import Path

from leanpo_core.config import ConfigError

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"
ENV_TEMPLATE = re.compile(r"^\{\{\s*\$(\w+)\s*\}\}$")
_UNSET = object()


def declared(path: Path = PREFECT_YAML) -> list[dict]:
    """The `deployments` of prefect.yaml, as written."""
    import yaml

    return yaml.safe_load(path.read_text())["deployments"]


def flow_key(entrypoint: str, flows: dict[str, tuple[str, str]]) -> str:
    """The `leanpo run` name of an entrypoint such as flows/train.py:train_flow."""
    file, _, attribute = entrypoint.partition(":")
    module = file.removesuffix(".py").replace("/", ".")
    for key, target in flows.items():
        if target == (module, attribute):
            return key
    raise ConfigError(f"prefect.yaml entrypoint {entrypoint} is not one of the flows {sorted(flows)}")


def resolve_environment(value, environ: typing.Mapping[str, str]):
    """`value` with each `{{ $VAR }}` string replaced by VAR's value; keys whose VAR is unset are left out."""
    if isinstance(value, dict):
        resolved = {k: resolve_environment(v, environ) for k, v in value.items()}
        return {k: v for k, v in resolved.items() if v is not _UNSET}
    if isinstance(value, str) and (match := ENV_TEMPLATE.match(value)):
        return environ.get(match.group(1), _UNSET)
    return value


def merge(base: dict, over: dict) -> dict:
    """`over` merged into `base`, nested mappings key by key."""
    merged = dict(base)
    for key, value in over.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key),
                                                                                          dict) else value
    return merged


def missing_required(flow_obj, parameters: dict) -> list[str]:
    """Required parameters of `flow_obj` (top-level, and the required fields of its config models) not given."""
    from pydantic import BaseModel

    hints = typing.get_type_hints(flow_obj.fn)
    missing = []
    for name, parameter in inspect.signature(flow_obj.fn).parameters.items():
        given = parameters.get(name)
        if parameter.default is parameter.empty and given is None:
            missing.append(name)
        model = hints.get(name)
        if isinstance(model, type) and issubclass(model, BaseModel) and (given is not None or
                                                                          parameter.default is parameter.empty):
            missing += [f"{name}.{field}" for field, info in model.model_fields.items()
                        if info.is_required() and field not in (given or {})]
    return missing


def runner_deployments(sections: dict[str, dict], flows: dict[str, tuple[str, str]], load_flow,
                       environ: typing.Mapping[str, str] | None = None, path: Path = PREFECT_YAML) -> tuple[list, list]:
    """(RunnerDeployments for `prefect.serve`, one line per schedule left out) from prefect.yaml; `sections` are
    `leanpo serve --config`'s parameters per flow key, already checked."""
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    environ = os.environ if environ is None else environ
    deployments, notes = [], []
    for spec in declared(path):
        key = flow_key(spec["entrypoint"], flows)
        flow_obj = load_flow(key)
        parameters = merge(resolve_environment(spec.get("parameters") or {}, environ), sections.get(key) or {})
        schedules = [Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                     for s in spec.get("schedules") or []]
        if schedules and (missing := missing_required(flow_obj, parameters)):
            notes.append(f"{spec['name']}: served without its schedule (its parameters lack {', '.join(missing)}: "
                         f"give them in the config's {key} section)")
            schedules = []
        triggers = [DeploymentEventTrigger(**{k: v for k, v in trigger.items() if k != "type"})
                    for trigger in spec.get("triggers") or []]
        deployments.append(flow_obj.to_deployment(
            spec["name"], description=spec.get("description"), tags=spec.get("tags"), parameters=parameters,
            schedules=schedules or None, triggers=triggers or None, concurrency_limit=spec.get("concurrency_limit")))
    return deployments, notes
