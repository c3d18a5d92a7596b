"""One training job per run directory: a live holder is named, a dead one's lock is taken over."""
import logging
import socket

import pytest
from engine_launch import hold_run_lock

from pretrain.engine.run_lock import RunDirLocked, RunLock


def test_a_live_holder_is_named_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    holder = hold_run_lock(tmp_path)
    try:
        with pytest.raises(RunDirLocked, match=rf"{tmp_path} is in use by another training job \(host "
                                               rf"{socket.gethostname()}, pid {holder.pid}, job SLURM_JOB_ID=4242"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # dies holding it, as a SIGKILLed rank does
        holder.wait()
    with caplog.at_level(logging.WARNING):
        lock = RunLock(tmp_path).acquire()
    assert f"pid {holder.pid}" in caplog.text and "ended without releasing it" in caplog.text
    lock.release()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        RunLock(tmp_path).acquire().release()  # released cleanly before: no warning
    assert "taking over" not in caplog.text
