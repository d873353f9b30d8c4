"""The launcher owns its child's process group: output streamed, failures raised with the tail, no orphans."""

import sys
import time

import pytest

from leanpo_core.launch import LaunchError, run


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
