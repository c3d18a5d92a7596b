"""Launching `pretrain train` as several local processes, the way a launcher would (for the engine tests).

Each rank is its own session (so a test can SIGKILL it together with its DataLoader workers) and
writes its output to rank<N>.log. OMP_NUM_THREADS=1 as under torchrun, so runs are bit-comparable
with the `tiny_runs` fixture's.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Variables of an enclosing launcher must not leak into the ranks we start.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Job:
    def __init__(self, procs: list[subprocess.Popen], logs: list[Path]) -> None:
        self.procs, self.logs = procs, logs

    def output(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-6000:]}" for log in self.logs)

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"training job did not finish within {timeout} s\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL every rank and its DataLoader workers (each rank leads its own session)."""
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait()


def launch(args: list[str], nproc: int, log_dir: Path, *, env: dict | None = None, slurm: bool = False) -> Job:
    """`python -m pretrain <args>` as nproc ranks with torchrun-style (or srun-style) variables."""
    log_dir.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    base.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    port = str(free_port())
    procs, logs = [], []
    for rank in range(nproc):
        if slurm:
            rank_env = dict(SLURM_PROCID=str(rank), SLURM_NTASKS=str(nproc), SLURM_LOCALID=str(rank),
                            SLURM_JOB_NODELIST="localhost", MASTER_PORT=port)
        else:
            rank_env = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = log_dir / f"rank{rank}.log"
        with open(log, "w") as fh:
            procs.append(subprocess.Popen([sys.executable, "-m", "pretrain", *args], env={**base, **rank_env},
                                          stdout=fh, stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log)
    return Job(procs, logs)


def metrics_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(job: Job, run_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in metrics_rows(run_dir)):
            return
        if any(p.poll() is not None for p in job.procs):
            job.kill()
            pytest.fail(f"a rank exited before step {step}\n{job.output()}")
        time.sleep(0.1)
    job.kill()
    pytest.fail(f"step {step} not reached within {timeout} s\n{job.output()}")


HOLD_LOCK = ("import sys, time; from pretrain.engine.run_lock import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
             "print('HELD', flush=True); time.sleep(600)")


def hold_run_lock(run_dir: Path, job_id: str = "4242") -> subprocess.Popen:
    """Another job's process holding run_dir's lock (SLURM job job_id) until the test kills it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "SLURM_JOB_ID": job_id})
    assert proc.stdout.readline().strip() == "HELD"
    return proc


def assert_resumes_exactly_from_step_8(base: Path, overrides: list[str], reference_dir: Path, tmp_path: Path,
                                       keys: tuple[str, ...]) -> None:
    """A copy of a 16-step tiny run cut back to its step-8 checkpoint, trained on by 2 processes: steps 9-16
    must log exactly the uninterrupted run's `keys`."""
    import shutil

    from pretrain.engine import checkpoint as ckpt

    run_dir = tmp_path / reference_dir.name
    shutil.copytree(reference_dir, run_dir)
    ckpt_dir = run_dir / ckpt.CHECKPOINTS
    shutil.rmtree(ckpt_dir / "step-00000016")
    (ckpt_dir / ckpt.LATEST).write_text("step-00000008")
    job = launch(["train", str(base), *overrides, f"train.run_dir={run_dir}", f"train.run_name={reference_dir.name}"], 2,
                 tmp_path / "logs")
    assert job.wait() == [0, 0], job.output()
    resumed, reference = metrics_rows(run_dir), metrics_rows(reference_dir)
    assert [r["step"] for r in resumed] == list(range(1, 17))
    for ours, theirs in zip(resumed[8:], reference[8:]):
        assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}, f"step {ours['step']}"
    assert "resumed from" in (run_dir / "train.log").read_text()
