"""A training-like process with loader workers, for the worker-guard tests (tests/engine/test_worker_guard.py).

    python loader_probe.py DATA_DIR [--exit]

Installs the trainer's preemption handler, starts a loader with 2 workers and reads 2 batches, then
prints "READY <pid> ..." (its loader's processes: forkserver, workers, resource tracker). Once a
preemption signal has arrived it reads 6 more batches, as the trainer does until the step's end,
and prints "CHECKPOINTED <signal>"; a test kills it before that to see its children die with it.
With --exit it ends right after READY with its loader still running (as a trainer that returns or
raises mid-stream does), for a test that it exits all the same.
"""
import sys
import time

import psutil

STILL_RUNNING = []  # a loader iterator alive until interpreter exit

from pretrain.data.stream import build_loader
from pretrain.engine.signals import PreemptionFlag


def main() -> None:
    with PreemptionFlag() as flag:
        loader = build_loader(sys.argv[1], "train", batch_size=4, rank=0, world_size=1, num_workers=2, seed=0)
        batches = iter(loader)
        for _ in range(2):
            next(batches)
        children = psutil.Process().children(recursive=True)
        print("READY", *sorted(p.pid for p in children), flush=True)
        if "--exit" in sys.argv:
            STILL_RUNNING.append(batches)
            return
        deadline = time.monotonic() + 60
        while not flag.requested and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the signal has reached every process of the group by now
        for _ in range(6):
            next(batches)
        print("CHECKPOINTED", flag.signal_name, flush=True)


if __name__ == "__main__":  # loader workers import this module
    main()
