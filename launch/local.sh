#!/usr/bin/env bash
# One machine: a loopback-only Ray started by the run itself, the embedded store, then training.
#   launch/local.sh CONFIG [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: launch/local.sh CONFIG [key=value ...]" >&2; exit 2; }
[ -f "$1" ] || { echo "local.sh: config file not found: $1" >&2; exit 2; }
[ -x .venv/bin/asyncrl ] || { echo "local.sh: .venv/bin/asyncrl missing (run launch/setup.sh)" >&2; exit 2; }
# A RAY_ADDRESS left in the shell would make the run join that cluster instead.
unset RAY_ADDRESS
cmd=(.venv/bin/asyncrl train "$@")
echo "[local] ${cmd[*]}"
exec "${cmd[@]}"
