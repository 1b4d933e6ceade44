#!/usr/bin/env bash
# Submit a job to a running Ray cluster: `ray job submit` with a runtime environment that ships this
# repository (the config included) as the working directory; the job runs `asyncrl train CONFIG ...`.
#   RAY_ADDRESS=http://HEAD:8265 launch/submit.sh CONFIG [key=value ...]
# The job API needs the head's dashboard (cluster.sh start-head --dashboard). The store must be reachable
# from every node: pass store.url=redis://... or store.bind=<the head's address> with store.password.
# The job runs `python` as the head's Ray processes find it (cluster.sh puts its Ray's Python first on
# their PATH); ASYNCRL_PYTHON names another interpreter of the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: RAY_ADDRESS=http://HEAD:8265 launch/submit.sh CONFIG [key=value ...]" >&2; exit 2; }
config=$1; shift
[ -f "$config" ] || { echo "submit.sh: config file not found: $config" >&2; exit 2; }
[ -n "${RAY_ADDRESS:-}" ] || { echo "submit.sh: set RAY_ADDRESS to the cluster's job API, e.g. http://10.0.0.1:8265" >&2; exit 2; }
RAY=${RAY:-.venv/bin/ray}
[ -x "$RAY" ] || RAY=$(command -v ray) || { echo "submit.sh: no ray executable (run launch/setup.sh)" >&2; exit 2; }
# Validate here, so a bad key fails before anything is uploaded.
.venv/bin/asyncrl config show "$config" "$@" >/dev/null
runtime_env=$(printf '{"working_dir": ".", "excludes": [".venv", "runs", ".git"], "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}')
cmd=("$RAY" job submit --address "$RAY_ADDRESS" --runtime-env-json "$runtime_env" -- "${ASYNCRL_PYTHON:-python}" -m asyncrl train "$config" --quiet "$@")
echo "[submit] ${cmd[*]}"
exec "${cmd[@]}"
