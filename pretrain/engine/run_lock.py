"""One training job per run directory: <run_dir>/run.lock, held by rank 0 for the whole run.

Two jobs in one directory interleave their metric rows and overwrite each other's checkpoints (seen
after killing only the torchrun agent: its ranks trained on, unsupervised, and a relaunch joined
them). The lock is a POSIX record lock (fcntl.lockf; also honoured on NFS): the kernel drops it when
the holder dies, however it dies, so a lock left by a dead job is free and is taken over. The file
says who holds it (host, pid, job id, start time), for the refusal message; a clean release empties
it, so a non-empty file found free means its writer died (a warning names it).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from pretrain.config import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
JOB_ID_VARS = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")


class RunDirLocked(ConfigError):
    """Another live job holds the run directory."""


def _holder() -> dict:
    job = next((f"{var}={os.environ[var]}" for var in JOB_ID_VARS if os.environ.get(var)), "none")
    return {"host": os.environ.get("SLURMD_NODENAME") or socket.gethostname(), "pid": os.getpid(), "job": job,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _describe(record: str) -> str:
    try:
        h = json.loads(record)
        return f"host {h['host']}, pid {h['pid']}, job {h['job']}, since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fh = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunDirLocked naming the live holder."""
        fh = open(self.path, "a+")
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = _describe(fh.read())
            fh.close()
            raise RunDirLocked(f"{self.path.parent} is in use by another training job ({holder}); stop that job "
                               "first, or use another train.run_name / train.run_dir") from None
        fh.seek(0)
        previous = fh.read().strip()
        if previous:
            log.warning("taking over %s from a job that ended without releasing it (%s)", self.path, _describe(previous))
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(_holder()))
        fh.flush()
        os.fsync(fh.fileno())
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is None:
            return
        self._fh.seek(0)
        self._fh.truncate()  # empty: released cleanly (the next holder need not warn)
        self._fh.flush()
        fcntl.lockf(self._fh, fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None
