#!/usr/bin/env bash
# Start, join or stop a Ray cluster node with asyncrl's defaults: no dashboard unless --dashboard, node address
# 127.0.0.1 with --loopback, usage stats off, token auth off. Extra flags go to `ray start` as they are.
# (`ray start` still listens on the machine's address: it swaps 127.0.0.1 for it wherever nodes may join.)
#   launch/cluster.sh start-head [--port 6379] [--loopback] [--dashboard] [ray start flags...]
#   launch/cluster.sh join ADDRESS [--loopback] [ray start flags...]    e.g. join 10.0.0.1:6379 --resources '{"rollout_node": 1}'
#   launch/cluster.sh stop [ray stop flags...]                        stops EVERY Ray process of this machine (ray stop)
set -euo pipefail
SCRIPT=$(realpath "$0")
cd "$(dirname "$SCRIPT")/.."
RAY=${RAY:-.venv/bin/ray}
[ -x "$RAY" ] || RAY=$(command -v ray) || { echo "cluster.sh: no ray executable (run launch/setup.sh)" >&2; exit 2; }
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
# The node's processes (and the jobs launch/submit.sh sends) find this Ray's Python first as `python`.
PATH="$(cd "$(dirname "$RAY")" && pwd):$PATH"
export PATH

usage() { sed -n '2,7p' "$SCRIPT" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
action=$1; shift

common=()
dashboard=(--include-dashboard=false)
rest=()
while [ $# -gt 0 ]; do
  case $1 in
    --loopback) common+=(--node-ip-address 127.0.0.1); shift ;;
    --port) port=$2; shift 2 ;;
    --dashboard) dashboard=(--include-dashboard=true --dashboard-host 127.0.0.1); shift ;;
    *) rest+=("$1"); shift ;;
  esac
done

case $action in
  start-head)
    cmd=("$RAY" start --head --port "${port:-6379}" "${dashboard[@]}" --disable-usage-stats ${common[@]+"${common[@]}"} ${rest[@]+"${rest[@]}"})
    ;;
  join)
    [ ${#rest[@]} -ge 1 ] || { echo "cluster.sh: join needs the head's ADDRESS (host:port)" >&2; exit 2; }
    address=${rest[0]}; rest=("${rest[@]:1}")
    cmd=("$RAY" start --address "$address" --disable-usage-stats ${common[@]+"${common[@]}"} ${rest[@]+"${rest[@]}"})
    ;;
  stop)
    cmd=("$RAY" stop ${rest[@]+"${rest[@]}"})
    ;;
  *) echo "cluster.sh: unknown action '$action' (start-head, join, stop)" >&2; usage ;;
esac
echo "[cluster] ${cmd[*]}"
exec "${cmd[@]}"
