#!/usr/bin/env bash
# A throw-away SLURM cluster on this machine, for testing the sbatch scripts for real:
# a private munged, slurmctld and N node daemons (`slurmd -N nodeK`, each with its own port and
# NodeAddr=127.0.0.1), all configured, logging and keeping state under DIR. Needs root and Debian's
# slurm-wlm + munge packages (`make system-deps`). Nothing outside DIR is touched.
#
#   slurm/testing/start_cluster.sh DIR [NODES [CPUS_PER_NODE]]
#   export SLURM_CONF=DIR/slurm.conf      # then sbatch / squeue / scontrol use this cluster
#   slurm/testing/stop_cluster.sh DIR
#
# CPUS_PER_NODE may exceed the machine's cores (SlurmdParameters=config_overrides): CPU-only test
# jobs then share the real cores. Ports come from the environment or are picked free.
set -euo pipefail

DIR=$(mkdir -p "$1" && cd "$1" && pwd)
NODES=${2:-2}
CPUS=${3:-4}
for tool in munged slurmctld slurmd scontrol sinfo; do
    command -v "$tool" >/dev/null || { echo "start_cluster: $tool not found: install slurm-wlm and munge (make system-deps)" >&2; exit 2; }
done
[ "$(id -u)" -eq 0 ] || { echo "start_cluster: needs root (slurmd starts jobs as their users)" >&2; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
CTLD_PORT=${SLURMCTLD_PORT:-$(free_port)}

mkdir -p "$DIR/munge" "$DIR/state" "$DIR/log"
chmod 755 "$DIR/munge"   # munged insists that clients can reach its socket

# munge: a private key and socket, so a system munged (if any) is neither needed nor disturbed.
dd if=/dev/urandom bs=1 count=1024 of="$DIR/munge/munge.key" status=none
chmod 400 "$DIR/munge/munge.key"
munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"

NODE_LINES=""
NODE_NAMES=""
for i in $(seq 1 "$NODES"); do
    NODE_LINES+="NodeName=node$i NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$CPUS RealMemory=1000 State=UNKNOWN"$'\n'
    NODE_NAMES+="${NODE_NAMES:+,}node$i"
    mkdir -p "$DIR/spool/node$i"
done

: > "$DIR/plugstack.conf"   # no SPANK plugins (the system's plugstack.conf.d is not ours)
# slurmd 22.05 loads a cgroup plugin even with proctrack/linuxproc + task/none (22.05 has no
# "disabled"); on a cgroup v2 machine without systemd (containers) it must not ask systemd.
cat > "$DIR/cgroup.conf" <<EOF
CgroupPlugin=autodetect
IgnoreSystemd=yes
EOF
cat > "$DIR/slurm.conf" <<EOF
ClusterName=pretraintest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
# cred_expire: a requeued job may start again this many seconds after it stopped (default 120, minimum 5).
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout=60
$NODE_LINES
PartitionName=debug Nodes=$NODE_NAMES Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

export SLURM_CONF=$DIR/slurm.conf
slurmctld -c -f "$SLURM_CONF"
for i in $(seq 1 "$NODES"); do
    slurmd -N "node$i" -f "$SLURM_CONF"
done

# Ready when every node reports idle.
for _ in $(seq 1 60); do
    idle=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)
    [ "$idle" -ge "$NODES" ] && { echo "SLURM_CONF=$SLURM_CONF"; exit 0; }
    sleep 1
done
echo "start_cluster: nodes not idle after 60 s; logs in $DIR/log:" >&2
sinfo -N -l >&2 || true
tail -n 20 "$DIR"/log/*.log >&2 || true
exit 1
