"""`pretrain launch`: N ranks on one host whose rendezvous store listens on 127.0.0.1 only."""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import tiny_runs as tiny_runs_script
from engine_launch import LAUNCHER_VARS, metrics_rows

from pretrain.commands.launch import exit_status
from pretrain.engine import checkpoint as ckpt
from pretrain.engine.signals import EXIT_PREEMPTED


@pytest.fixture(scope="module")
def base(tiny_data, tmp_path_factory):
    """base.yaml of the tiny runs (tiny data, tiny model, random targets), without training them all."""
    from pretrain.config import save_resolved

    out = tmp_path_factory.mktemp("launch")
    return tiny_runs_script.prepare(out, save_resolved(tiny_data, out, name="tiny_data.yaml"))


def start(args: list[str], log) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PYTHONUNBUFFERED="1")
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def pretrain_launch(base, run_dir, log, *extra: str) -> subprocess.Popen:
    return start([sys.executable, "-m", "pretrain", "launch", "--nproc-per-node", "2", "train", str(base),
                  *tiny_runs_script.RUNS["zero2"], f"train.run_dir={run_dir}", *extra], log)


def listening(proc: subprocess.Popen) -> list[str]:
    """The TCP addresses on which proc or any of its descendants listens."""
    tree = [psutil.Process(proc.pid)]
    tree += tree[0].children(recursive=True)
    pids = {p.pid for p in tree}
    return [c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank (each rank leads its own session)."""
    try:
        tree = [psutil.Process(proc.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def wait_until(predicate, proc, log_path, timeout=240.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_tree(proc)
            pytest.fail(f"launcher exited ({proc.poll()}) or timed out\n{log_path.read_text()[-5000:]}")
        time.sleep(0.2)


def test_exit_status_prefers_preemption_then_the_first_failure():
    assert exit_status([0, 0]) == 0
    assert exit_status([1, EXIT_PREEMPTED]) == EXIT_PREEMPTED
    assert exit_status([0, -signal.SIGKILL, 3]) == 128 + signal.SIGKILL


def test_launch_trains_two_ranks_with_its_store_on_loopback_only(base, tmp_path):
    """Fails under torchrun --standalone, whose TCPStore listens on every interface (see the next test)."""
    run_dir, log_path = tmp_path / "run", tmp_path / "launch.log"
    with open(log_path, "w") as log:
        proc = pretrain_launch(base, run_dir, log, "train.steps=4", "train.checkpoint_every=4")
    wait_until(lambda: len(psutil.Process(proc.pid).children()) == 2 and listening(proc), proc, log_path)
    seen = set()
    while proc.poll() is None:  # sampled until the end: the ranks' rendezvous must not open a server either
        seen.update(listening(proc))
        time.sleep(0.1)
    output = log_path.read_text()
    assert proc.wait() == 0, output[-5000:]
    assert seen and all(ipaddress.ip_address(ip).is_loopback for ip in seen), seen
    assert "pretrain launch: 2 x `python -m pretrain train" in output
    assert [r["step"] for r in metrics_rows(run_dir)] == [1, 2, 3, 4]
    tag = (run_dir / ckpt.CHECKPOINTS / ckpt.LATEST).read_text()
    assert ckpt.read_meta(run_dir / ckpt.CHECKPOINTS / tag)["world_size"] == 2
    assert all(ckpt.read_rank_state(run_dir / ckpt.CHECKPOINTS / tag, r)["rank"] == r for r in (0, 1))


def test_torchrun_standalone_listens_beyond_loopback(tmp_path):
    """Why `pretrain launch` exists: the same check fails for torchrun --standalone (cheap: ranks only sleep)."""
    script = tmp_path / "sleep.py"
    script.write_text("import time; time.sleep(60)\n")
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        proc = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script)], log)
    try:
        wait_until(lambda: psutil.Process(proc.pid).children(), proc, log_path, timeout=60)
        assert any(not ipaddress.ip_address(ip).is_loopback for ip in listening(proc))
    finally:
        kill_tree(proc)


def test_a_failing_rank_stops_the_other_and_fails_the_launch(base, tmp_path):
    run_dir, log_path = tmp_path / "run", tmp_path / "launch.log"
    with open(log_path, "w") as log:
        proc = pretrain_launch(base, run_dir, log, "train.steps=100000", "train.checkpoint_every=100000")
    wait_until(lambda: any(r["step"] >= 2 for r in metrics_rows(run_dir)), proc, log_path)
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == 2
    ranks[1].kill()
    try:
        status = proc.wait(timeout=60)
        # Usually the killed rank's 137; rank 0 may fail first on the broken connection (1).
        assert status not in (0, EXIT_PREEMPTED), log_path.read_text()[-5000:]
    finally:
        kill_tree(proc)
    assert not ranks[0].is_running() or ranks[0].status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_a_signal_to_the_launcher_checkpoints_every_rank_and_exits_99(base, tmp_path, signum):
    # USR1: SLURM's warning before the time limit; TERM: a cancel or a requeue. Both are forwarded.
    run_dir, log_path = tmp_path / "run", tmp_path / "launch.log"
    with open(log_path, "w") as log:
        proc = pretrain_launch(base, run_dir, log, "train.steps=100000", "train.checkpoint_every=100000")
    wait_until(lambda: any(r["step"] >= 2 for r in metrics_rows(run_dir)), proc, log_path)
    proc.send_signal(signum)
    try:
        assert proc.wait(timeout=120) == EXIT_PREEMPTED, log_path.read_text()[-5000:]
    finally:
        kill_tree(proc)
    tag = (run_dir / ckpt.CHECKPOINTS / ckpt.LATEST).read_text()
    assert tag == ckpt.tag_for_step(metrics_rows(run_dir)[-1]["step"])
    assert ckpt.read_meta(run_dir / ckpt.CHECKPOINTS / tag)["world_size"] == 2
