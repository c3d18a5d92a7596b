"""`pretrain launch`: N ranks on this host, with the rendezvous store on loopback only.

torchrun (also `--standalone`) starts torch's TCPStore, which listens unauthenticated on every
interface (torch has no bind address for it). Here the launcher binds a socket to 127.0.0.1 itself,
hosts the store on it (TCPStore's master_listen_fd) and starts the ranks with
TORCHELASTIC_USE_AGENT_STORE=True, so their env:// rendezvous connects to it as clients instead of
starting a server of their own. For several nodes, use torchrun or srun (docs/operations.md).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

from pretrain.engine.signals import EXIT_PREEMPTED

HELP = "run a stage as N processes on this host (like torchrun --standalone, store on 127.0.0.1)"
DESCRIPTION = __doc__ + "\nExample: pretrain launch --nproc-per-node 2 train configs/tiny.yaml train.run_name=continuous"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc-per-node", type=int, default=2, metavar="N", help="processes (ranks) to start, default 2")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER, metavar="STAGE ...",
                        help="the pretrain stage and its arguments, e.g. train configs/tiny.yaml")


def loopback_store(world_size: int):
    """A TCPStore server on a free 127.0.0.1 port: (store, port)."""
    import torch.distributed as dist

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    # The store takes the listening socket over (libuv server: the one that accepts master_listen_fd).
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=True, timeout=timedelta(minutes=30),
                          wait_for_workers=False, master_listen_fd=sock.detach(), use_libuv=True)
    return store, port


def exit_status(ended: list[int]) -> int:
    """Of the ranks' statuses (in the order they ended): 99 (preempted) if any rank exited 99, else
    the first failure (death by signal N as 128+N, as a shell reports it), else 0."""
    if EXIT_PREEMPTED in ended:
        return EXIT_PREEMPTED
    failed = [c if c > 0 else 128 - c for c in ended if c != 0]
    return failed[0] if failed else 0


def run(args: argparse.Namespace) -> int:
    stage_args = args.stage_args[1:] if args.stage_args[:1] == ["--"] else args.stage_args
    if not stage_args:
        raise ValueError("launch: name the stage to run, e.g. `pretrain launch --nproc-per-node 2 train configs/tiny.yaml`")
    n = args.nproc_per_node
    if n < 1:
        raise ValueError(f"launch: --nproc-per-node must be at least 1, not {n}")
    store, port = loopback_store(n)
    cmd = [sys.executable, "-m", "pretrain", *stage_args]
    print(f"pretrain launch: {n} x `python -m pretrain {' '.join(stage_args)}`, store on 127.0.0.1:{port}", flush=True)
    common = dict(os.environ, WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
                  # As under torchrun: ranks checkpoint and stop if this launcher dies; the run lock's job id.
                  TORCHELASTIC_RUN_ID=f"pretrain-launch-{os.getpid()}")
    for var in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        common.pop(var, None)  # our variables, not an enclosing srun's, say who each rank is
    common.setdefault("OMP_NUM_THREADS", "1")
    # Own sessions: a Ctrl-C reaches the ranks once, forwarded, not also from the terminal.
    procs = [subprocess.Popen(cmd, env={**common, "RANK": str(r), "LOCAL_RANK": str(r)}, start_new_session=True)
             for r in range(n)]

    def forward(signum, _frame):
        for p in procs:
            p.send_signal(signum)  # a no-op for a rank that has ended

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    ended: list[int] = []  # exit statuses, in the order the ranks ended
    running = list(procs)

    def reap() -> None:
        for p in [p for p in running if p.poll() is not None]:
            running.remove(p)
            ended.append(p.returncode)

    try:
        while running:
            reap()
            if running and any(ended):
                # A failed rank: the others would wait for it in a collective until the timeout.
                # Grace: after a preemption (99) the peers are finishing the same checkpoint.
                deadline = time.monotonic() + (120 if EXIT_PREEMPTED in ended else 5)
                while running and time.monotonic() < deadline:
                    time.sleep(0.2)
                    reap()
                for p in running:
                    p.kill()
                    p.wait()
                reap()
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        del store
    return exit_status(ended)
