#!/usr/bin/env bash
# Stops what start_cluster.sh DIR started: its jobs, node daemons, controller and munged (by their
# pid files under DIR, nothing else).
set -uo pipefail
DIR=$(cd "$1" && pwd) || exit 0
export SLURM_CONF=$DIR/slurm.conf

[ -f "$SLURM_CONF" ] && scancel --quiet --full --user="$(id -un)" 2>/dev/null

stop_pidfile() {
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null
}

for pidfile in "$DIR"/slurmd-*.pid; do stop_pidfile "$pidfile"; done
stop_pidfile "$DIR/slurmctld.pid"
stop_pidfile "$DIR/munge/munged.pid"
exit 0
