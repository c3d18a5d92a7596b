"""The loader's child processes: deaf to the preemption signals, and dying with their parent.

srun delivers the job's warning signal (USR1) or a cancel's TERM to every process of the step, and
torchrun forwards TERM to a rank's whole process group: the DataLoader workers, their forkserver and
multiprocessing's resource tracker receive it too. Their default action is to die, and the trainer
then fails on its next batch instead of checkpointing. So:

- ``loader_children()`` wraps the start of the loader's processes: the preemption signals are
  blocked in this thread meanwhile, and a blocked mask is inherited through fork and exec, so the
  forkserver, the resource tracker and the workers never act on them (the trainer alone does; a
  signal that arrives in that window is delivered to it when the block ends).
- The forkserver imports this module (its preload list): there, ``_in_forkserver()`` also sets the
  signals to SIG_IGN (kept by the forked workers) and asks the kernel to SIGKILL it when the trainer
  dies (PR_SET_PDEATHSIG); ``init_loader_worker`` does the same in each worker for the forkserver.
  Without that, a rank killed by SIGKILL left its forkserver, workers and tracker running for good.
  The resource tracker exits by itself once every process holding its pipe is gone.
- Ignoring TERM also defeats multiprocessing's own exit handler, which terminates (SIGTERM) the
  daemonic children still running and then joins them: a process whose loader iterator was still
  alive at exit hung there. ``_kill_loader_workers_at_exit`` runs first (atexit is last in, first
  out) and ends them with SIGKILL instead.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys

from pretrain.engine.signals import SIGNALS

# The pid of the process that starts the loader's forkserver, for the forkserver to recognise it.
PARENT_ENV = "PRETRAIN_LOADER_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def ignore_preemption_signals() -> None:
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def die_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent ends (Linux); exit now if the
    parent is already gone."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the request was in place
        os._exit(1)


def _kill_loader_workers_at_exit() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:  # DataLoader workers are; multiprocessing would terminate them (SIGTERM) and wait
            child.kill()
            child.join(timeout=5)


@contextlib.contextmanager
def loader_children():
    """Start the loader's processes inside this: they inherit a mask blocking the preemption signals."""
    atexit.unregister(_kill_loader_workers_at_exit)  # once, and after multiprocessing's own handler
    atexit.register(_kill_loader_workers_at_exit)
    os.environ[PARENT_ENV] = str(os.getpid())
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        # Only the forkserver started just now may take it for itself, not a later child process.
        os.environ.pop(PARENT_ENV, None)


def init_loader_worker(worker_id: int) -> None:  # noqa: ARG001 (DataLoader's worker_init_fn signature)
    ignore_preemption_signals()
    die_with_parent(os.getppid())


def _in_forkserver() -> bool:
    """True in a direct child of the process that ran loader_children(), i.e. its forkserver."""
    return os.environ.get(PARENT_ENV) == str(os.getppid())


if _in_forkserver():  # imported as the forkserver's preload (pretrain.data.stream.worker_start_context)
    ignore_preemption_signals()
    die_with_parent(os.getppid())
