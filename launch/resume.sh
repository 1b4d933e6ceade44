#!/usr/bin/env bash
# Resume a run from a checkpoint folder (asyncrl ckpt resume): the run goes on in CKPT/../.. at the step after it.
#   launch/resume.sh CKPT [key=value ...]     e.g. launch/resume.sh runs/demo/checkpoints/step-000010 run.steps=40
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: launch/resume.sh CKPT [key=value ...]" >&2; exit 2; }
[ -d "$1" ] || { echo "resume.sh: checkpoint folder not found: $1" >&2; exit 2; }
ckpt="$(cd "$1" && pwd)"  # before the cd below, so a path relative to the caller's folder works
shift
cd "$(dirname "$0")/.."
cmd=(.venv/bin/asyncrl ckpt resume "$ckpt" "$@")
echo "[resume] ${cmd[*]}"
exec "${cmd[@]}"
