#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, for testing: a head and N worker nodes as separate `ray start`
# processes on 127.0.0.1, each with its own resources, ports and temp dir.
#
#   cluster/local_cluster.sh start [--workers 2] [--head-cpus 1] [--worker-cpus 1] [--port 6390] [--dir DIR]
#   cluster/local_cluster.sh stop [--dir DIR]
#
# Prints RAY_ADDRESS (the GCS) and the dashboard URL for `ray job submit --address ...`. `stop` stops only
# the processes this script started (`ray stop` would stop every Ray process of the user). Auth is off
# (RAY_AUTH_MODE=disabled): the cluster listens on 127.0.0.1 only; clients must set the same.
set -euo pipefail

cmd=${1:-}; shift || true
workers=2 head_cpus=1 worker_cpus=1 port=6390 dir=${TMPDIR:-/tmp}/icdray-local-cluster
while [[ $# -gt 0 ]]; do
  case $1 in
    --workers) workers=$2; shift 2 ;;
    --head-cpus) head_cpus=$2; shift 2 ;;
    --worker-cpus) worker_cpus=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
RAY=${RAY:-$(command -v ray)}
export RAY_AUTH_MODE=disabled

case $cmd in
  start)
    mkdir -p "$dir"
    dash=$((port + 1))
    # --block keeps each `ray start` in the foreground; killing it tears its node down
    setsid "$RAY" start --head --block --node-ip-address=127.0.0.1 --port="$port" \
      --num-cpus="$head_cpus" --resources='{"head": 1}' --include-dashboard=true \
      --dashboard-host=127.0.0.1 --dashboard-port="$dash" --temp-dir="$dir/head" \
      --object-store-memory=200000000 >"$dir/head.log" 2>&1 &
    echo $! >"$dir/pids"
    for _ in $(seq 120); do "$RAY" status --address="127.0.0.1:$port" >/dev/null 2>&1 && break; sleep 1; done
    for i in $(seq 1 "$workers"); do
      setsid "$RAY" start --block --address="127.0.0.1:$port" --node-ip-address=127.0.0.1 \
        --num-cpus="$worker_cpus" --resources="{\"worker\": 1, \"worker$i\": 1}" \
        --object-store-memory=200000000 >"$dir/worker$i.log" 2>&1 &
      echo $! >>"$dir/pids"
    done
    want=$((workers + 1))
    for _ in $(seq 120); do
      n=$("$RAY" status --address="127.0.0.1:$port" 2>/dev/null | grep -c "node_" || true)
      [[ $n -ge $want ]] && break; sleep 1
    done
    echo "RAY_ADDRESS=127.0.0.1:$port"
    echo "dashboard: http://127.0.0.1:$dash (ray job submit --address http://127.0.0.1:$dash)"
    ;;
  stop)
    [[ -f $dir/pids ]] || { echo "no cluster started from $dir"; exit 0; }
    while read -r pid; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done <"$dir/pids"
    sleep 3
    while read -r pid; do kill -KILL -- "-$pid" 2>/dev/null || true; done <"$dir/pids"
    rm -f "$dir/pids"
    echo "stopped"
    ;;
  *) echo "usage: $0 start|stop [options]" >&2; exit 2 ;;
esac
