#!/usr/bin/env bash
# Body of the sbatch scripts (single_node.sbatch, multi_node.sbatch); runs as the job's batch shell
# on the first node of the allocation.
#
#   job.sh [CONFIG.yaml] [KEY=VALUE ...]    one `pretrain train` task per GPU (srun)
#   job.sh --command CMD [ARG ...]          any command, one task per GPU, same environment
#
# - Rendezvous: MASTER_ADDR = the first node's address (NodeAddr from `scontrol show node`, which
#   is its hostname on most clusters), MASTER_PORT derived from the job id; ranks come from
#   SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (slurm/task.sh).
# - Run directory keyed by the job: $RUN_ROOT/<job name>-<job id> (the id survives a requeue, so a
#   requeued job resumes there); RUN_DIR overrides it.
# - Preemption: SLURM sends the warning signal (sbatch --signal=B:USR1@SECONDS) to this shell; it is
#   forwarded to the tasks, the trainer checkpoints and exits 99 (pretrain.engine.signals.EXIT_PREEMPTED),
#   and the job requeues itself (`scontrol requeue`) to resume from that checkpoint. A cancel
#   (SIGTERM to this shell and the tasks) also checkpoints, but is never requeued.
#
# Environment: PYTHON (default: python, i.e. the virtualenv active at sbatch time), RUN_ROOT
# (default runs/slurm), RUN_DIR, MASTER_PORT, MAX_REQUEUES (default 20), PRETRAIN_REPO (default:
# the directory sbatch was called from).
set -uo pipefail

EXIT_PREEMPTED=99
REPO=${PRETRAIN_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO" || { echo "job.sh: cannot cd to $REPO: submit from the repository or set PRETRAIN_REPO" >&2; exit 2; }
say() { echo "[job.sh $(date +%H:%M:%S) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}] $*"; }

# Rendezvous, exported to every task (srun passes the environment on).
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')}
# Different for every job (jobs may share a node) and every restart (no clash with a dying predecessor).
MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID * 8 + ${SLURM_RESTART_COUNT:-0}) % 40000))}
export MASTER_ADDR MASTER_PORT

if [ "${1:-}" = "--command" ]; then
    shift
    cmd=("$@")
else
    RUN_DIR=${RUN_DIR:-${RUN_ROOT:-runs/slurm}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
    export RUN_DIR
    cmd=("${PYTHON:-python}" -m pretrain train "$@" "train.run_dir=$RUN_DIR")
fi
say "nodes $SLURM_JOB_NODELIST, $SLURM_NTASKS tasks, master $MASTER_ADDR:$MASTER_PORT${RUN_DIR:+, run dir $RUN_DIR}"
say "command: ${cmd[*]}"

# The warning signal reaches this shell only (B: in --signal); srun forwards it to the tasks.
warned=0
terminated=0
srun_pid=""
on_warning() {
    warned=1
    say "got SIG$1: asking the tasks to checkpoint and stop"
    [ -n "$srun_pid" ] && kill -s "$1" "$srun_pid" 2>/dev/null
}
trap 'on_warning USR1' USR1
# scancel (or the time limit itself) signals the tasks directly: wait for them to checkpoint, and
# do not requeue: a cancelled job must stay cancelled.
trap 'terminated=1; say "got SIGTERM: waiting for the tasks"' TERM

srun --export=ALL "$REPO/slurm/task.sh" "${cmd[@]}" &
srun_pid=$!
while :; do
    wait "$srun_pid"
    rc=$?
    # A trapped signal interrupts `wait` with status > 128 while srun still runs: wait again.
    if [ "$rc" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
    break
done
say "tasks exited with status $rc"

# SIGTERM is also how SLURM stops a job it requeues itself (`scontrol requeue`, preemption): a requeue
# has already counted the next start (Restarts), a cancel has not.
restarts=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.* Restarts=\([0-9]*\).*/\1/p' | head -n 1)
if [ "$terminated" -eq 1 ] && [ "${restarts:-0}" -gt "${SLURM_RESTART_COUNT:-0}" ]; then
    say "stopped by SLURM for a requeue (restart ${restarts} follows): the job starts again and resumes from its last checkpoint"
elif [ "$terminated" -eq 1 ]; then
    say "cancelled (SIGTERM): not requeueing; to resume from its last checkpoint, submit again with RUN_DIR=${RUN_DIR:-<its run dir>}"
elif [ "$rc" -eq "$EXIT_PREEMPTED" ] || { [ "$warned" -eq 1 ] && [ "$rc" -ne 0 ]; }; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "${MAX_REQUEUES:-20}" ]; then
        say "not requeueing: already restarted ${SLURM_RESTART_COUNT} times (MAX_REQUEUES)"
        exit "$rc"
    fi
    say "requeueing; the next start resumes from the latest checkpoint"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    say "scontrol requeue failed (job cancelled?): resubmit to resume"
fi
exit "$rc"
