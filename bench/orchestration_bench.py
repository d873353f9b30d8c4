"""Orchestration overhead: the data-refresh flow through Prefect vs the same stage functions called directly.

    .venv/bin/python bench/orchestration_bench.py [--rounds 2] [--videos 3]

Inputs (tiny, built offline under bench/.cache/): a toy Qwen2-VL (`leanpo_core.toy`), --videos synthetic clips
(`leanpo_core.synthetic`, one question each), 4 frames at max_side 64, 1 candidate per side of at most 8 tokens
with the transformers backend, judge answers of 4 tokens, every pair kept.

  direct  the stages as `tasks/data.py` runs them, without Prefect: read_videos + write_videos, run_frames,
          `python -m leanpo_core.sample` and `python -m leanpo_core.reflect` children (`launch.run_module`),
          run_pairs
  flow    `flows.data_refresh.data_refresh(...)` called in process against a temporary local Prefect server
          (no PREFECT_API_URL; its own PREFECT_HOME under a temporary folder), which also publishes artifacts,
          announces the pairs event and writes the refresh report

Every run writes into a fresh run folder (so nothing resumes and no task cache hits; a cached task would be flagged).
One untimed run of each (the flow's starts the temporary server), then --rounds rounds in alternating order; medians.
Per stage, the flow's time is its task run's slot: from the end of the previous task run (the flow run's start for
the first) to the end of its own, read back from the Prefect API, so the time Prefect spends creating task runs,
proposing states, persisting results and publishing artifacts falls into the stage it belongs to; the tail after
`pairs` (announce event, report) is its own row. Overhead = flow slot - direct time; target < 2 s per stage.
Writes bench/results/orchestration.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

STAGES = ("ingest", "frames", "sample", "reflect", "pairs")


def configs(model: str):
    from leanpo_core.config import FramesConfig, PairsConfig, ReflectConfig, SampleConfig

    return {"frames": FramesConfig(num_frames=4, max_side=64),
            "sample": SampleConfig(model=model, backend="transformers", num_candidates=1, max_new_tokens=8,
                                   max_model_len=512, shard_size=2),
            "reflect": ReflectConfig(backend="transformers", judge_max_tokens=4),
            "pairs": PairsConfig(trust_filter=False)}


def run_direct(manifest: str, root: str, model: str) -> dict[str, float]:
    """The five stages without Prefect; seconds per stage."""
    from leanpo_core.frames import run_frames
    from leanpo_core.launch import run_module
    from leanpo_core.layout import RunLayout
    from leanpo_core.pairs import run_pairs
    from leanpo_core.videos import read_videos, write_videos

    cfg, layout, times = configs(model), RunLayout(root), {}
    work = Path(tempfile.mkdtemp(dir=common.CACHE, prefix="orch-cfg-"))

    def config_file(name: str) -> str:
        path = work / f"{name}.json"
        path.write_text(cfg[name].model_dump_json())
        return str(path)

    server_cpu, own_cpu = _server_cpu(), time.process_time()
    start = time.perf_counter()
    rows = [r for r in read_videos(manifest) if r.get("split") in ("train", None)]
    write_videos(rows, layout.videos)
    times["ingest"] = time.perf_counter() - start
    start = time.perf_counter()
    run_frames(layout.videos, layout.frames, layout.failures("frames"), cfg["frames"], progress=False)
    times["frames"] = time.perf_counter() - start
    start = time.perf_counter()
    run_module("leanpo_core.sample", ["--config", config_file("sample"), "--root", root, "--no-progress"])
    times["sample"] = time.perf_counter() - start
    start = time.perf_counter()
    run_module("leanpo_core.reflect", ["--config", config_file("reflect"), "--model", model, "--root", root])
    times["reflect"] = time.perf_counter() - start
    start = time.perf_counter()
    run_pairs(layout.videos, layout.frames, layout.scored, layout.pairs, cfg["pairs"])
    times["pairs"] = time.perf_counter() - start
    times["own CPU"], times["server CPU"] = time.process_time() - own_cpu, _server_cpu() - server_cpu
    shutil.rmtree(work)
    return times


def run_flow(manifest: str, root: str, model: str) -> dict[str, float]:
    """The data-refresh flow in process; seconds per stage slot (see the module docstring), plus the tail."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.data_refresh import data_refresh

    cfg = configs(model)
    server_cpu, own_cpu = _server_cpu(), time.process_time()
    start = time.perf_counter()
    state = data_refresh(manifest=manifest, root=root, sample=cfg["sample"], frames=cfg["frames"],
                         reflect=cfg["reflect"], pairs=cfg["pairs"], return_state=True)
    wall = time.perf_counter() - start
    own_cpu, server_cpu = time.process_time() - own_cpu, _server_cpu() - server_cpu
    if not state.is_completed():
        raise RuntimeError(f"data-refresh ended {state.name}: {state.message}")
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    runs = sorted(runs, key=lambda r: r.end_time)
    ends, inside = {}, {}
    for run in runs:
        name = run.task_key.split(".")[-1] if run.name.split("-")[0] not in STAGES else run.name.split("-")[0]
        if run.state_name == "Cached":
            print(f"warning: task {run.name} was cached", flush=True)
        ends[name], inside[name] = run.end_time, (run.end_time - run.start_time).total_seconds()
    times, previous = {}, flow_run.start_time
    for stage in STAGES:
        times[stage] = (ends[stage] - previous).total_seconds()
        times[f"{stage} in task"] = inside[stage]
        previous = ends[stage]
    times["tail (event, report)"] = (flow_run.end_time - previous).total_seconds()
    times["call wall"] = wall
    times["flow run"] = (flow_run.end_time - flow_run.start_time).total_seconds()
    times["own CPU"], times["server CPU"] = own_cpu, server_cpu
    return times


def _server_cpu() -> float:
    """CPU seconds used so far by this process's living descendants (the temporary Prefect server; stage children
    have exited by the time this is read)."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            cpu = child.cpu_times()
            total += cpu.user + cpu.system
        except psutil.Error:
            pass
    return total


def spread(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs]
    return max(values) - min(values)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each side, alternating")
    parser.add_argument("--videos", type=int, default=3, help="synthetic clips (one question each)")
    args = parser.parse_args(argv)
    cache = common.ensure_cache()
    home = Path(tempfile.mkdtemp(dir=cache, prefix="orch-prefect-"))
    os.environ.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"})
    os.environ.pop("PREFECT_API_URL", None)

    from leanpo_core import synthetic, toy

    model = str(toy.build_toy_model("qwen2_vl", cache / "orch-model", seed=0))
    manifest = str(synthetic.generate(cache / f"orch-clips-{args.videos}", num=args.videos, seed=0,
                                      questions_per_clip=1))
    runs = {"direct": [], "flow": []}
    sides = {"direct": run_direct, "flow": run_flow}
    cold = {}
    for r in range(-1, args.rounds):
        for side in (("direct", "flow") if r % 2 else ("flow", "direct")):
            root = tempfile.mkdtemp(dir=cache, prefix=f"orch-run-{side}-")
            times = sides[side](manifest, root, model)
            shutil.rmtree(root, ignore_errors=True)
            print(f"{'warm-up' if r < 0 else f'round {r}'} {side}: "
                  + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()), flush=True)
            if r < 0:
                cold[side] = times
            else:
                runs[side].append(times)

    med = {side: {k: common.median([t[k] for t in runs[side]]) for k in runs[side][0]} for side in runs}
    rows = []
    for stage in STAGES:
        overhead = med["flow"][stage] - med["direct"][stage]
        noise = max(spread(runs["direct"], stage), spread(runs["flow"], stage))
        verdict = "met" if overhead < 2 else ("not resolved (noise)" if overhead < 2 + noise else "missed")
        rows.append([stage, f"{med['direct'][stage]:.2f}", f"{med['flow'][stage]:.2f}", f"**{overhead:+.2f}**",
                     f"{noise:.2f}", verdict, f"{med['flow'][f'{stage} in task']:.2f}"])
    tail = med["flow"]["tail (event, report)"]
    rows.append(["tail: announce event + report", "-", f"{tail:.2f}", f"**{tail:+.2f}**",
                 f"{spread(runs['flow'], 'tail (event, report)'):.2f}", "met" if tail < 2 else "missed", "-"])
    direct_total = sum(med["direct"][s] for s in STAGES)
    rows.append(["whole run (call to return)", f"{direct_total:.2f}", f"{med['flow']['call wall']:.2f}",
                 f"{med['flow']['call wall'] - direct_total:+.2f}", "-", "-", "-"])
    body = [f"{args.videos} synthetic clips, toy Qwen2-VL, transformers backend; "
            f"{common.versions('prefect', 'torch')}; temporary local Prefect server (SQLite); {args.rounds} timed "
            "round(s) of each side after one untimed run each, alternating; medians, seconds. The sample/reflect "
            "stages start a model-loading child each, so their direct times vary by seconds from run to run (more "
            "when the load average above exceeds the core count: other jobs shared the cores).", "",
            *common.table(["stage", "direct s", "flow slot s", "overhead s", "run-to-run spread s", "< 2 s",
                           "flow: inside the task run s"], rows),
            "", "Spread: the larger of max - min over the rounds of either side; an overhead above 2 s but within "
            "2 s + spread is reported as not resolved.", "",
            f"Untimed first flow run (temporary server start included): {cold['flow']['call wall']:.1f} s from call "
            f"to return, vs {sum(cold['direct'][s] for s in STAGES):.1f} s direct.", "",
            "CPU seconds per run besides the stage children (medians): the calling process "
            f"{med['direct']['own CPU']:.1f} direct, {med['flow']['own CPU']:.1f} flow (Prefect's client, task "
            f"engine, log and event shipping); the temporary Prefect server (its own process on the same cores) "
            f"{med['direct']['server CPU']:.1f} during a direct run (idle), {med['flow']['server CPU']:.1f} during a "
            "flow run.", ""]
    text = common.write_result("orchestration", "Orchestration overhead: Prefect data-refresh flow vs direct calls",
                               common.command_line("orchestration_bench.py", argv), body)
    print(text)
    return text


if __name__ == "__main__":
    main()
