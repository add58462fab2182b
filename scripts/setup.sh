#!/usr/bin/env bash
# Creates .venv and installs everything onnxpress needs, Debian packages included. Idempotent:
# `make demo` and `make test` call it whenever the venv is missing or the inputs changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

# Debian packages: the aarch64 cross compiler and qemu-user for ARM builds checked under emulation.
need_apt=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need_apt+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || need_apt+=(qemu-user)
if ((${#need_apt[@]})); then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian packages: ${need_apt[*]}"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "setup: warning: ${need_apt[*]} missing and apt-get unavailable; ARM tests will skip" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# torch first, pinned to the local CPU build, so nothing below pulls a multi-GB CUDA build.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c constraints.txt -e ".[all]"
# timm imports torchvision at import time; onnxpress.zoo provides a stand-in, so no deps here.
"$VENV/bin/python" -c "import timm" 2>/dev/null || "${PIP[@]}" --no-deps -c constraints.txt timm
if [ -f scripts/setup_browser.sh ]; then
    bash scripts/setup_browser.sh   # Debian's chromium, for the HTML report's rendering test
fi
if [ -f scripts/setup_arm_runtime.sh ]; then
    bash scripts/setup_arm_runtime.sh
fi
touch "$VENV/.installed"
echo "setup: done ($VENV)"
