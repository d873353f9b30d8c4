"""Where shard tasks run: the data-refresh flow's `task_runner` setting as one of Prefect's task runners.

"thread" (the default): each sharded stage (frames, reflect) is one task that runs its shards in turn.
"dask" / "ray": each shard is its own task run, submitted to Prefect's `DaskTaskRunner` (prefect-dask) or
`RayTaskRunner` (prefect-ray); the stage's task that follows finds every shard done and publishes
the table. Without `cluster_address` a local cluster of `local_workers` processes starts on 127.0.0.1 for the flow
run and stops with it; with one, the shards go to that running cluster, whose workers need this environment, the
tables (S3 or a shared filesystem) and the Prefect API (docs/operations.md, section 6).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal

from prefect import Task, get_client
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import TaskRunner

from leanpo_core.config import ConfigError
from leanpo_core.decode_worker import MALLOC_ENV

TaskRunnerName = Literal["thread", "dask", "ray"]


def _worker_environment() -> dict[str, str]:
    """What a local cluster's workers need to report their task runs: this flow run's API. Under a temporary
    server (no PREFECT_API_URL) each worker would otherwise start a temporary server of its own."""
    with get_client(sync_client=True) as client:
        return {"PREFECT_API_URL": str(client.api_url)}


def shard_runner(kind: TaskRunnerName, cluster_address: str | None = None,
                 local_workers: int = 2) -> TaskRunner | None:
    """The task runner that shard tasks go to (None for "thread"), checked before any work: a ConfigError names
    the flow parameter. Nothing starts until the first shard is submitted."""
    if kind == "thread":
        if cluster_address:
            raise ConfigError(f"cluster_address={cluster_address!r} needs task_runner 'dask' or 'ray' (it is "
                              "'thread': shards run in this process)")
        return None
    if local_workers < 1:
        raise ConfigError(f"local_workers must be at least 1, got {local_workers}")
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if cluster_address:
            return DaskTaskRunner(address=cluster_address)
        # One thread per worker process: a frames shard decodes in a child process of its own and a scoring shard
        # in a stage process, so more threads per worker would only interleave the shards' writes. Dask's nanny sets
        # MALLOC_TRIM_THRESHOLD_ to 64 KiB in its workers, which the decode process would inherit in place of its
        # own heap setting (leanpo_core/decode_worker.py; with it, a tenth of the page faults per decoded frame).
        env = {**_worker_environment(), "MALLOC_TRIM_THRESHOLD_": MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]}
        return DaskTaskRunner(cluster_kwargs={"n_workers": local_workers, "threads_per_worker": 1,
                                              "processes": True, "host": "127.0.0.1", "dashboard_address": None,
                                              "env": env})
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ConfigError("task_runner 'ray' needs prefect-ray, which is not installed: "
                              "pip install prefect-ray==0.6.0 (it resolves beside Prefect 3.7.7), or use "
                              "task_runner 'dask'") from None
        if cluster_address:
            return RayTaskRunner(address=cluster_address)
        # A local cluster addresses its own processes on loopback and starts no dashboard. Ray's servers still
        # listen on every interface (it has no setting for that), behind Ray's token authentication.
        return RayTaskRunner(init_kwargs={"num_cpus": local_workers, "_node_ip_address": "127.0.0.1",
                                          "include_dashboard": False,
                                          "runtime_env": {"env_vars": _worker_environment()}})
    raise ConfigError(f"task_runner must be one of thread, dask, ray; got {kind!r}")


@contextlib.contextmanager
def running(runner: TaskRunner | None) -> Iterator[TaskRunner | None]:
    """Start `runner` for the block (a local cluster stops at its end); None passes through."""
    if runner is None:
        yield None
        return
    with runner:
        yield runner


def submit_shards(runner: TaskRunner, shard_task: Task, shards: list[int], **parameters: Any) -> list[PrefectFuture]:
    """One run of `shard_task(**parameters, shard=i)` per shard index, submitted to `runner`, all waited for: the
    stage task given them as `wait_for` starts only if every shard completed (a killed worker's shard is rerun by
    the cluster, a failed one retried by Prefect)."""
    futures = [runner.submit(shard_task, {**parameters, "shard": shard}) for shard in shards]
    wait(futures)
    return futures
