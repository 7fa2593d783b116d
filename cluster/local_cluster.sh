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

# every node on this one IP needs its own agent, metrics and worker ports (the defaults would collide)
node_ports() {  # node index (0 = head) -> ray start port options
  local b=$((port + 100 + $1 * 300))
  echo "--dashboard-agent-listen-port=$b --dashboard-agent-grpc-port=$((b + 1)) --metrics-export-port=$((b + 2))" \
    "--runtime-env-agent-port=$((b + 3)) --node-manager-port=$((b + 4)) --object-manager-port=$((b + 5))" \
    "--min-worker-port=$((b + 10)) --max-worker-port=$((b + 290))"
}
export RAY_AUTH_MODE=disabled
export PATH="$(dirname "$RAY"):$PATH"  # jobs' `python` is the one next to this ray

active_nodes() { "$RAY" status --address="127.0.0.1:$port" 2>/dev/null | sed -n '/^Active:/,/^Pending:/p' | grep -c " node_" || true; }

case $cmd in
  start)
    mkdir -p "$dir"
    dash=$((port + 1))
    # Ray's own temp dir stays short: its unix sockets live there (AF_UNIX paths are limited to 107 bytes)
    raytmp=/tmp/ray-lc-$port
    echo "$raytmp" >"$dir/raytmp"
    # --block keeps each `ray start` in the foreground; killing it tears its node down
    setsid "$RAY" start --head --block --node-ip-address=127.0.0.1 --port="$port" \
      --num-cpus="$head_cpus" --resources='{"head": 1}' --include-dashboard=true \
      --dashboard-host=127.0.0.1 --dashboard-port="$dash" --temp-dir="$raytmp" \
      --object-store-memory=200000000 $(node_ports 0) >"$dir/head.log" 2>&1 &
    head_pid=$!
    echo $head_pid >"$dir/pids"
    up=0
    for _ in $(seq 120); do
      kill -0 $head_pid 2>/dev/null || { echo "the head node exited; see $dir/head.log" >&2; tail -n 20 "$dir/head.log" >&2; exit 1; }
      "$RAY" status --address="127.0.0.1:$port" >/dev/null 2>&1 && { up=1; break; }
      sleep 1
    done
    [[ $up = 1 ]] || { echo "the head node did not come up in 120 s; see $dir/head.log" >&2; exit 1; }
    # the Jobs API is served by the dashboard
    for _ in $(seq 120); do curl -sf "http://127.0.0.1:$dash/api/version" >/dev/null && break; sleep 1; done
    for i in $(seq 1 "$workers"); do  # one at a time: a node registers before the next one starts
      setsid "$RAY" start --block --address="127.0.0.1:$port" --node-ip-address=127.0.0.1 \
        --num-cpus="$worker_cpus" --resources="{\"worker\": 1, \"worker$i\": 1}" \
        --object-store-memory=200000000 $(node_ports "$i") >"$dir/worker$i.log" 2>&1 &
      echo $! >>"$dir/pids"
      for _ in $(seq 180); do [[ $(active_nodes) -gt $i ]] && break; sleep 1; done
      [[ $(active_nodes) -gt $i ]] || { echo "worker node $i did not join; see $dir/worker$i.log" >&2; exit 1; }
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
    [[ -f $dir/raytmp ]] && rm -rf "$(cat "$dir/raytmp")"
    echo "stopped"
    ;;
  *) echo "usage: $0 start|stop [options]" >&2; exit 2 ;;
esac
