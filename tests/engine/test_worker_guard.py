"""Loader workers, their forkserver and the resource tracker under SLURM/torchrun signals and rank death.

srun and torchrun signal every process of a step (killpg): the children must leave the preemption
signals to the trainer, which checkpoints; and they must not outlive a rank that dies.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

PROBE = Path(__file__).with_name("loader_probe.py")


def _start_probe(data_dir: Path, *args: str) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, str(PROBE), str(data_dir), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        pytest.fail(f"the probe did not start: {line}{proc.communicate()[1]}")
    children = [int(pid) for pid in line.split()[1:]]
    assert len(children) >= 4, line  # forkserver, resource tracker, 2 workers
    return proc, children


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_the_whole_step_leaves_the_loader_working(tiny_data, sig):
    proc, _ = _start_probe(tiny_data.data_dir)
    os.killpg(proc.pid, sig)  # as srun does with the warning signal, and torchrun with TERM
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and f"CHECKPOINTED {sig.name}" in out, err[-3000:]


def test_the_loader_processes_die_with_their_rank(tiny_data):
    proc, children = _start_probe(tiny_data.data_dir)
    proc.kill()  # the rank alone, as when it crashes or the OOM killer picks it
    proc.wait()
    deadline = time.monotonic() + 20
    alive = children
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"still running 20 s after their rank died: {alive}"


def test_a_process_exits_with_its_loader_still_running(tiny_data):
    """Workers that ignore TERM must not hang the exit (multiprocessing terminates and joins them)."""
    proc, _ = _start_probe(tiny_data.data_dir, "--exit")
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the process hung at exit with its loader workers alive")
    assert proc.returncode == 0
