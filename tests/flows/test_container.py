"""docker/Dockerfile.cpu built as it is and `leanpo demo` run inside the image (marked slow: 7.5 minutes on the 2-core
VM, about 10 GB of disk; `pytest -m slow tests/flows/test_container.py`).

No Docker engine runs on the project's machines, so the image is built with buildah (Debian's daemonless builder:
`apt-get install buildah debootstrap`, as root; vfs storage and chroot isolation, which work inside a container).
No registry is reachable either, so Docker Hub's python:3.11-slim-bookworm is replaced through the Dockerfile's
BASE_IMAGE argument by an equivalent made here with debootstrap from the Debian mirror (Debian's Python 3.11, its
venv module and headers, CA certificates), built once and kept under a local tag. The host's pip settings (its
index, wheel folder, constraints) are handed to the build, so the image installs what `make setup` installs here.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE = "localhost/leanpo-test-base:bookworm-py311-dev"
BUILDAH = ["buildah", "--storage-driver", "vfs"]

pytestmark = pytest.mark.slow


def buildah(*args: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*BUILDAH, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"buildah {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def base_image(tmp_path: Path) -> str:
    """BASE: Debian bookworm with Python 3.11, its venv module and headers (python:3.11-slim has them; torch's
    inductor needs them to compile vLLM's vision kernels on CPU), made with debootstrap once and reused by tag."""
    if buildah("images", "--quiet", BASE, check=False).returncode == 0:
        return BASE
    rootfs = tmp_path / "rootfs"
    packages = "python3,python3-venv,python3-dev,ca-certificates"
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={packages}", "bookworm", str(rootfs)], check=True,
                   capture_output=True, timeout=900)
    context = tmp_path / "base"
    context.mkdir()
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(context / "rootfs.tar"), "."], check=True)
    (context / "Containerfile").write_text("FROM scratch\nADD rootfs.tar /\nCMD [\"bash\"]\n")
    buildah("bud", "--isolation", "chroot", "-t", BASE, str(context))
    return BASE


def pip_settings(tmp_path: Path) -> tuple[Path, list[str], str]:
    """The host's effective pip settings as one pip.conf, the local paths they name (to mount read-only at the same
    place) and the extra index URL (the Dockerfile's PIP_EXTRA_INDEX_URL, which its ENV would otherwise blank)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True).stdout
    conf = configparser.ConfigParser()
    conf["global"] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        conf["global"][name] = value.strip().strip("'\"")
    path = tmp_path / "pip.conf"
    with open(path, "w") as out:
        conf.write(out)
    mounts = set()
    for value in conf["global"].values():
        for token in value.split():
            local = Path(token.removeprefix("file://"))
            if token.startswith(("/", "file://")) and local.exists():
                mounts.add(str(local.parent if local.name == "simple" else local))
    return path, sorted(mounts), conf["global"].get("extra-index-url", "")


def test_cpu_image_builds_and_runs_the_demo(tmp_path):
    missing = [tool for tool in ("buildah", "debootstrap") if not shutil.which(tool)]
    if missing:
        pytest.fail(f"{missing} not installed: `apt-get install buildah debootstrap` (as root) to run this test")
    base = base_image(tmp_path)
    conf, mounts, extra_index = pip_settings(tmp_path)
    tag = f"localhost/leanpo-cpu-test:{uuid.uuid4().hex[:8]}"
    volumes = [f"--volume={conf}:/etc/pip.conf:ro"] + [f"--volume={m}:{m}:ro" for m in mounts]
    buildah("bud", "--isolation", "chroot", "--file", "docker/Dockerfile.cpu", "--build-arg", f"BASE_IMAGE={base}",
            "--build-arg", f"PIP_EXTRA_INDEX_URL={extra_index}", *volumes, "--tag", tag, str(REPO), timeout=2400)
    container = buildah("from", tag).stdout.strip().splitlines()[-1]
    try:
        help_text = buildah("run", "--isolation", "chroot", container, "--", "leanpo", "--help").stdout
        assert "leanpo demo" in help_text
        demo = buildah("run", "--isolation", "chroot", container, "--", "leanpo", "demo", "--workdir", "/tmp/demo",
                       timeout=1800)
        out = demo.stdout
        assert "held-out answer accuracy on the 'test' split" in out, out[-4000:]
        assert "SFT model (before)" in out and "LeanPO (after)" in out and "evaluation gate:" in out, out[-4000:]
    finally:
        buildah("rm", container, check=False)
        buildah("rmi", tag, check=False)
