"""Who am I in the job: rank, world size and rendezvous, from whichever launcher started us.

- torchrun and the `deepspeed` launcher export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
- SLURM's srun (one task per GPU) exports SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the node
  list; the master is MASTER_ADDR if the batch script set it, else the first host of the allocation.
- No launcher: one process on this machine.
DeepSpeed reads the standard variables, so we export them before initialising it (without them it
falls back to MPI discovery and fails on a missing mpi4py).
"""
from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

import torch

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "env" (RANK... set by torchrun or the deepspeed launcher), "slurm" or "none"

    def export(self, environ: dict | None = None) -> None:
        """Write the standard variables (what torch.distributed / DeepSpeed read)."""
        env = os.environ if environ is None else environ
        env.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank), WORLD_SIZE=str(self.world_size),
                   MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03' (zero padding kept)."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM node list: set MASTER_ADDR to the first node's address")
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first comma outside brackets ends the first entry
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], nodelist[:end])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={environ[name]!r} is not an integer (set by the launcher?)") from None


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "env"
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        addr = env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if world > 1 else "127.0.0.1")
        # Every task derives the same port from the job id, so no extra coordination is needed.
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        else:
            port = 20000 + _int(env, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in env else DEFAULT_PORT
    else:
        launcher = "none"
        rank, world, local_rank = 0, 1, 0
        addr = "127.0.0.1"
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else _free_port()
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world} (launcher {launcher}): check the launcher's environment")
    return DistEnv(rank, local_rank, world, addr, port, launcher)


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(env: DistEnv | None = None, backend: str | None = None) -> DistEnv:
    """Export the environment and start torch.distributed through DeepSpeed (default: gloo on CPU,
    NCCL on GPU; `backend` chooses, e.g. gloo for a CPU benchmark on a GPU machine)."""
    import deepspeed
    import torch.distributed as dist

    env = env or detect()
    env.export()
    if dist.is_initialized():
        return env
    # The shared-memory op only serves inference all-reduce and costs a ~70 s g++ build on first use.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if env.launcher == "none":
        # A single process needs no rendezvous: an in-memory store instead of a TCP store, which
        # would listen, unauthenticated, on every interface. DeepSpeed adopts the existing group.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    log.info("rank %d/%d (local %d) via %s, master %s:%d, backend %s", env.rank, env.world_size, env.local_rank,
             env.launcher, env.master_addr, env.master_port, backend)
    return env


def shutdown_distributed() -> bool:
    """Tear the process group down; True if there was one (False: nothing was started).

    Call it only after a normal return on every rank: destroying the group while another rank
    still waits in a collective (after an exception) would hang instead. DeepSpeed keeps references
    to the groups, so their gloo threads can live on into interpreter teardown and abort the process
    there ("terminate called without an active exception", exit 134): the command-line entry point
    therefore ends such a process without that teardown (cli.entry).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False
