#!/usr/bin/env bash
# Resume a run from a checkpoint folder (asyncrl ckpt resume).
#   launch/resume.sh CKPT [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: launch/resume.sh CKPT [key=value ...]" >&2; exit 2; }
[ -d "$1" ] || { echo "resume.sh: checkpoint folder not found: $1" >&2; exit 2; }
if ! .venv/bin/asyncrl ckpt --help >/dev/null 2>&1; then
  echo "resume.sh: this asyncrl has no 'ckpt' command yet (checkpoint/resume is not implemented)" >&2
  exit 2
fi
cmd=(.venv/bin/asyncrl ckpt resume "$@")
echo "[resume] ${cmd[*]}"
exec "${cmd[@]}"
