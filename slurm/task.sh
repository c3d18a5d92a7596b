#!/usr/bin/env bash
# One task of a job step (started by srun, one per GPU): the torch.distributed environment from
# SLURM's variables, then the command. MASTER_ADDR / MASTER_PORT come from slurm/job.sh.
export RANK=$SLURM_PROCID
export WORLD_SIZE=$SLURM_NTASKS
export LOCAL_RANK=$SLURM_LOCALID
export NODE_RANK=$SLURM_NODEID
tasks_here=${SLURM_STEP_TASKS_PER_NODE:-$WORLD_SIZE}   # e.g. "4(x2)"
export LOCAL_WORLD_SIZE=${tasks_here%%[(,]*}
# With one GPU per task bound by SLURM (--gpus-per-task) the task sees one device; otherwise all
# of the node's, and LOCAL_RANK picks one (the trainer does).
exec "$@"
