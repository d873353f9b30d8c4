"""The launcher owns its child's process group: output streamed, failures raised with the tail, no orphans."""

import contextlib
import os
import sys
import time
from pathlib import Path

import pytest

from leanpo_core.launch import LaunchError, run

REPO = Path(__file__).resolve().parents[2]


def test_streams_lines_and_returns_on_success():
    lines = []
    run([sys.executable, "-c", "print('one'); print('two')"], log=lines.append)
    assert lines == ["one", "two"]


def test_failure_raises_with_the_last_lines():
    code = "import sys\nfor i in range(100): print(f'line {i}')\nsys.exit(3)"
    with pytest.raises(LaunchError) as err:
        run([sys.executable, "-c", code], log=lambda _: None, tail_lines=5)
    assert err.value.returncode == 3 and err.value.tail == [f"line {i}" for i in range(95, 100)]
    assert "exit code 3" in str(err.value) and "line 99" in str(err.value)


def test_timeout_kills_the_whole_group(tmp_path):
    """A grandchild that ignores SIGTERM must die too (SIGKILL to the group after the grace period)."""
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', "
            "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            "print('started', flush=True); time.sleep(600)")
    start = time.monotonic()
    with pytest.raises(LaunchError, match="limit"):
        run([sys.executable, "-c", code], timeout_s=3, grace_s=1, log=lambda _: None)
    assert time.monotonic() - start < 30
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        if not alive(grandchild):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {grandchild} outlived the launcher")


def alive(pid: int) -> bool:
    """Running and not a zombie (an orphan killed here may wait for a reaper that a container's init never runs)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_distributed_command_for_each_launcher():
    from leanpo_core.launch import distributed_command

    assert distributed_command("m", ["--a", "1"], launcher="python") == [sys.executable, "-m", "m", "--a", "1"]
    torchrun = distributed_command("m", ["--a"], nproc_per_node=2)
    port = torchrun[4]
    assert torchrun[:6] == [sys.executable, "-m", "leanpo_core.loopback_store", "--port", port, "torch.distributed.run"]
    assert torchrun[torchrun.index("--master_port") + 1] == port and "--standalone" not in torchrun
    assert torchrun[torchrun.index("--master_addr") + 1] == "127.0.0.1"
    assert torchrun[torchrun.index("--nproc_per_node") + 1] == "2" and torchrun[-3:] == ["-m", "m", "--a"]
    fixed = distributed_command("m", [], nproc_per_node=2, master_port=29999)
    assert fixed[4] == fixed[fixed.index("--master_port") + 1] == "29999"
    ds = distributed_command("m", ["--a"], nproc_per_node=2, launcher="deepspeed", hostfile="hosts")
    assert ds[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"] and ds[-3:] == ["--module", "m", "--a"]
    assert ds[ds.index("--num_gpus") + 1] == "2" and ds[ds.index("--hostfile") + 1] == "hosts"
    one_node = distributed_command("m", ["--a"], nproc_per_node=2, launcher="deepspeed")
    assert one_node[-4:] == ["--module", "leanpo_core.loopback_store", "m", "--a"]
    ports = {int(distributed_command("m", [], launcher="deepspeed")[-4]) for _ in range(2)}
    assert all(1024 < p < 65536 for p in ports)
    for bad in (dict(launcher="python", nproc_per_node=2), dict(launcher="torchrun", hostfile="hosts"),
                dict(launcher="mpirun"), dict(nproc_per_node=0)):
        with pytest.raises(ValueError):
            distributed_command("m", [], **bad)


def test_stage_bad_input_is_deterministic_and_other_failures_are_not(tmp_path):
    """Real children: a stage refusing its config exits EXIT_BAD_INPUT with one line; argparse's usage error (2)
    is deterministic too; an unexpected error and a SIGKILL are not (the orchestrator may retry them)."""
    from leanpo_core.launch import EXIT_BAD_INPUT, run_module

    config = tmp_path / "train.json"
    config.write_text('{"model": "m", "objective": "no-such-objective"}')
    lines = []
    with pytest.raises(LaunchError) as err:
        run_module("leanpo_core.train", ["--config", str(config), "--pairs", "p", "--frames", "f",
                                         "--out", str(tmp_path / "out")], log=lines.append)
    assert err.value.returncode == EXIT_BAD_INPUT and err.value.deterministic
    assert len(lines) == 1 and "ConfigError" in lines[0] and "objective" in lines[0] and str(config) in lines[0]
    with pytest.raises(LaunchError) as err:
        run([sys.executable, "-c", "import argparse; argparse.ArgumentParser().parse_args(['--x'])"],
            log=lambda _: None)
    assert err.value.returncode == 2 and err.value.deterministic

    # Any other deterministic error (launch.DETERMINISTIC, the rule Prefect's retry condition reads too) exits 65
    # with its traceback: "no kept pairs" from a training child is not retried, as it is not in-process.
    same_again = "from leanpo_core.launch import stage_entry\ndef main(): raise ValueError('no kept pairs')\n"
    lines = []
    with pytest.raises(LaunchError) as err:
        run([sys.executable, "-c", same_again + "stage_entry(main)"], log=lines.append)
    assert err.value.returncode == EXIT_BAD_INPUT and err.value.deterministic
    assert any("Traceback" in line for line in lines) and "bad input: ValueError: no kept pairs" in lines[-1]
    transient = "from leanpo_core.launch import stage_entry\ndef main(): raise ConnectionError('reset by peer')\n"
    with pytest.raises(LaunchError) as err:
        run([sys.executable, "-c", transient + "stage_entry(main)"], log=lambda _: None)
    assert err.value.returncode == 1 and not err.value.deterministic and "reset by peer" in str(err.value)
    with pytest.raises(LaunchError) as err:
        run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], log=lambda _: None)
    assert err.value.returncode == -9 and not err.value.deterministic


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_multi_rank_failure_names_the_rank_and_keeps_its_exit_code(launcher, tmp_path):
    """A real 2-rank launch: rank 1 refuses its input (EXIT_BAD_INPUT) while rank 0 waits. The error names rank 1
    with its exit code and stays deterministic, whatever the launcher's own exit code (torchrun: 1). torchrun tags
    each rank's lines, so the error carries rank 1's own lines (not rank 0's); the deepspeed launcher does not."""
    from leanpo_core.launch import EXIT_BAD_INPUT, run_module

    (tmp_path / "two_ranks.py").write_text(
        "import os, sys, time\n"
        "rank = int(os.environ['RANK'])\n"
        "print(f'rank {rank} starts', flush=True)\n"
        "if rank == 1:\n"
        "    from leanpo_core.config import ConfigError\n"
        "    from leanpo_core.launch import stage_entry\n"
        "    def main(): raise ConfigError('invalid config c.yaml: field x')\n"
        "    stage_entry(main)\n"
        "time.sleep(600)\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    with pytest.raises(LaunchError) as err:
        run_module("two_ranks", [], launcher=launcher, nproc_per_node=2, env=env, log=lambda _: None,
                   timeout_s=300, grace_s=2)
    e = err.value
    assert (e.failed_rank, e.rank_returncode) == (1, EXIT_BAD_INPUT) and e.deterministic
    assert e.returncode == (1 if launcher == "torchrun" else EXIT_BAD_INPUT)
    assert "rank 1 failed with exit code 65" in str(e) and "field x" in str(e)
    if launcher == "torchrun":
        assert "rank 1 starts" in e.rank_tail and not any("rank 0" in line for line in e.rank_tail)
        assert any("field x" in line for line in e.rank_tail)


RANKS_THAT_WAIT = ("import os, pathlib, time\n"
                   "import torch.distributed as dist\n"
                   "dist.init_process_group('gloo')\n"
                   "dist.barrier()\n"
                   "folder = pathlib.Path(os.environ['PROBE_DIR'])\n"
                   "(folder / f'rank-{dist.get_rank()}').write_text(os.environ['MASTER_ADDR'] + ' ' + "
                   "os.environ['MASTER_PORT'])\n"
                   "while not (folder / 'go').exists():\n"
                   "    time.sleep(0.1)\n"
                   "dist.barrier()\n"
                   "dist.destroy_process_group()\n")


def _loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 too


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_single_node_launch_rendezvous_on_loopback(launcher, tmp_path):
    """A real 2-rank gloo launch, its sockets read while both ranks wait in the group: the ranks are told
    MASTER_ADDR 127.0.0.1, every TCP connection of the launched tree joins two loopback addresses, and every
    listening socket is on loopback, the rendezvous store (torchrun's launcher process, DeepSpeed's rank 0 on
    MASTER_PORT) included: torch's own TCPStore server would bind every interface (`leanpo_core.loopback_store`)."""
    import threading

    import psutil

    from leanpo_core.launch import run_module

    (tmp_path / "wait_ranks.py").write_text(RANKS_THAT_WAIT)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "PROBE_DIR": str(tmp_path)}
    failures = []

    def launch():
        try:
            run_module("wait_ranks", [], launcher=launcher, nproc_per_node=2, env=env, log=lambda _: None,
                       timeout_s=120, grace_s=2)
        except LaunchError as exc:
            failures.append(exc)

    thread = threading.Thread(target=launch)
    thread.start()
    try:
        while not all((tmp_path / f"rank-{rank}").exists() for rank in (0, 1)):
            assert thread.is_alive(), failures
            time.sleep(0.1)
        [launched] = [p for p in psutil.Process().children() if "wait_ranks" in p.cmdline()]
        sockets = []  # (pid, whether the process is torchrun's launcher, connection)
        for proc in [launched, *launched.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                in_launcher = "torch.distributed.run" in proc.cmdline()
                sockets += [(proc.pid, in_launcher, conn) for conn in proc.net_connections("tcp")]
    finally:
        (tmp_path / "go").write_text("")
        thread.join(timeout=120)
    assert not failures and not thread.is_alive(), failures
    told = {(tmp_path / f"rank-{rank}").read_text().split()[0] for rank in (0, 1)}
    master_port = int((tmp_path / "rank-0").read_text().split()[1])
    assert told == {"127.0.0.1"}
    connected = [conn for _, _, conn in sockets if conn.status == psutil.CONN_ESTABLISHED]
    assert connected and all(_loopback(c.laddr.ip) and _loopback(c.raddr.ip) for c in connected), connected
    listening = [(pid, in_launcher, conn.laddr) for pid, in_launcher, conn in sockets
                 if conn.status == psutil.CONN_LISTEN]
    assert len(listening) >= 3, listening  # the store, and each rank's gloo pair
    stores = [address for pid, in_launcher, address in listening if in_launcher or address.port == master_port]
    assert stores and all(_loopback(address.ip) for address in stores), listening
    assert all(_loopback(address.ip) for _, _, address in listening), listening


def test_stage_dies_with_its_launcher(tmp_path):
    """A launcher SIGKILLed (as a Prefect worker and its flow-run process can be) cannot kill the group it started
    in a new session; the stage (`stage_entry`) notices its launcher is gone and stops its own group, grandchildren
    included."""
    import signal
    import subprocess

    pids = tmp_path / "pids"
    stage = ("import os, subprocess, sys, time\n"
             "from leanpo_core.launch import stage_entry\n"
             "def main():\n"
             "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
             f"    open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
             "    time.sleep(120)\n"
             "stage_entry(main)\n")
    launcher = ("import sys\nfrom leanpo_core.launch import run\n"
                f"run([sys.executable, '-c', {stage!r}], log=lambda _: None)\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher], cwd=REPO)
    try:
        for _ in range(600):
            if pids.exists() and len(pids.read_text().split()) == 2:
                break
            time.sleep(0.1)
        stage_pid, grandchild = map(int, pids.read_text().split())
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        def gone(pid: int) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except FileNotFoundError:
                return True

        for _ in range(200):
            if gone(stage_pid) and gone(grandchild):
                break
            time.sleep(0.1)
        assert gone(stage_pid) and gone(grandchild)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in (map(int, pids.read_text().split()) if pids.exists() else []):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
