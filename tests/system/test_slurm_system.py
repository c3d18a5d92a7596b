"""The project's own sbatch scripts on a real SLURM cluster (controller + two node daemons on this machine).

Three tiny CPU trainings run concurrently (the nodes declare 4 CPUs each, 8 tasks in all):
1 node x 2 tasks (local MLflow store), 2 nodes x 2 tasks (MLflow server), and 1 node x 2 tasks that
receives the warning signal mid-run, checkpoints, requeues itself and resumes. The uninterrupted
1 x 2 run is the reference for the preempted one: same config, same step count, same losses.
Every run reads its data with 2 loader workers and accumulates 2 micro-batches per step, and the
warning signal goes to every process of the job (workers, forkserver and resource tracker too), as
srun delivers it: the trainer alone must act on it.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pretrain.config import load_config, save_resolved

pytestmark = pytest.mark.system

STEPS = 150
SIGNAL_AFTER_STEP = 15
# A tiny model on the shared tiny dataset: the point is the launch path, not the learning.
TRAIN_OVERRIDES = [
    "targets.method=random", "targets.dim=16",
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
    "train.micro_batch_size=4", "train.grad_accum=2", f"train.steps={STEPS}", "train.warmup_steps=5", "train.zero_stage=2",
    "train.checkpoint_every=50", "train.keep_last=10", "train.log_every=1", "train.progress=false",
    "data.loader_workers=2", "data.shuffle_buffer=0",
]
JOB_TIMEOUT = 420


@pytest.fixture(scope="module")
def train_args(tiny_data, tmp_path_factory) -> list[str]:
    """`CONFIG overrides...` for the jobs: the session's tiny dataset, a random target table of our own."""
    from pretrain.targets.build import build_targets

    root = tmp_path_factory.mktemp("slurm-work")
    config = save_resolved(tiny_data, root, name="tiny_data.yaml")
    args = [str(config), f"data.dir={tiny_data.data_dir.resolve()}", f"targets.path={root / 'targets.safetensors'}",
            *TRAIN_OVERRIDES]
    build_targets(load_config(args[0], args[1:]), progress=False)
    return args


def _options(name: str, nodes: int, logs: Path) -> list[str]:
    # The scripts ask for GPUs and 8 CPUs per task; the test nodes have neither to spare.
    return [f"--job-name={name}", f"--nodes={nodes}", "--ntasks-per-node=2", "--gpus-per-node=0",
            "--cpus-per-task=1", "--time=15", f"--output={logs}/%x-%j.out"]


@pytest.fixture(scope="module")
def jobs(slurm_cluster, mlflow_server, train_args, tmp_path_factory):
    """Submit the three trainings at once; the preempted one gets USR1 once it has trained a few steps."""
    runs = tmp_path_factory.mktemp("slurm-runs")
    env = {"PYTHON": sys.executable, "RUN_ROOT": str(runs), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    base = train_args
    submitted = {
        "single": slurm_cluster.sbatch("slurm/single_node.sbatch", *base, options=_options("single", 1, runs), env=env),
        "multi": slurm_cluster.sbatch("slurm/multi_node.sbatch", *base, f"tracking.tracking_uri={mlflow_server}",
                                      "tracking.experiment=slurm-multi-node", options=_options("multi", 2, runs), env=env),
        "preempt": slurm_cluster.sbatch("slurm/single_node.sbatch", *base, options=_options("preempt", 1, runs), env=env),
    }
    out = {name: {"id": job_id, "run_dir": runs / f"{name}-{job_id}", "log": runs / f"{name}-{job_id}.out"}
           for name, job_id in submitted.items()}

    preempt = out["preempt"]
    deadline = time.monotonic() + JOB_TIMEOUT
    while _last_step(preempt["run_dir"]) < SIGNAL_AFTER_STEP:
        state = slurm_cluster.job(preempt["id"]).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"preempt job {state} before the signal:\n{_tail(preempt['log'])}"
        assert time.monotonic() < deadline, f"preempt job never reached step {SIGNAL_AFTER_STEP}:\n{_tail(preempt['log'])}"
        time.sleep(0.5)
    # The warning signal to the batch shell and to every process of the step (loader workers included).
    slurm_cluster.run("scancel", "--signal=USR1", "--full", str(preempt["id"]))
    preempt["signalled_at_step"] = _last_step(preempt["run_dir"])

    for job in out.values():
        job["info"] = slurm_cluster.wait(job["id"], JOB_TIMEOUT)
    return out


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _last_step(run_dir: Path) -> int:
    try:
        rows = _metrics(run_dir)
    except json.JSONDecodeError:  # a line being written
        return 0
    return rows[-1]["step"] if rows else 0


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text().splitlines()[-n:]) if path.is_file() else f"({path} not written)"


def _assert_completed(job: dict) -> None:
    assert job["info"]["JobState"] == "COMPLETED", f"job {job['id']} {job['info']['JobState']}:\n{_tail(job['log'])}"
    assert job["info"]["ExitCode"] == "0:0"


def _assert_trained(run_dir: Path) -> list[dict]:
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / f"step-{STEPS:08d}").is_dir()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:08d}"
    return rows


def test_rendezvous_across_two_real_nodes(slurm_cluster, tmp_path):
    """The launch helper's ranks and master address, printed by every task of a 2 x 2 job."""
    probe = ("import os; print('TASK', *(os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', "
             "'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'SLURMD_NODENAME')))")
    job_id = slurm_cluster.sbatch("slurm/multi_node.sbatch", "--command", sys.executable, "-c", probe,
                                  options=_options("probe", 2, tmp_path))
    info = slurm_cluster.wait(job_id, 120)
    log = (tmp_path / f"probe-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    tasks = sorted(line.split()[1:] for line in log.splitlines() if line.startswith("TASK "))
    assert [t[0] for t in tasks] == ["0", "1", "2", "3"], log
    assert {t[1] for t in tasks} == {"4"} and {t[3] for t in tasks} == {"2"}
    # Ranks fill node1 first; local ranks restart on each node.
    assert [(t[6], t[2]) for t in tasks] == [("node1", "0"), ("node1", "1"), ("node2", "0"), ("node2", "1")]
    # Node names do not resolve here: the master is node1's NodeAddr, one port for all tasks.
    assert {t[4] for t in tasks} == {"127.0.0.1"} and len({t[5] for t in tasks}) == 1
    assert info["NodeList"] == "node[1-2]"


def test_a_cancelled_job_checkpoints_but_is_not_requeued(slurm_cluster, tmp_path):
    """scancel: the tasks get SIGTERM and exit with EXIT_PREEMPTED (as the trainer does after its
    checkpoint); unlike after the warning signal, the job must stay cancelled."""
    job_id, log = _start_fake_task(slurm_cluster, tmp_path, "cancel")
    deadline = time.monotonic() + 120
    slurm_cluster.run("scancel", str(job_id))
    while "tasks exited with status" not in log.read_text():
        assert time.monotonic() < deadline, f"job.sh never saw its tasks end:\n{_tail(log)}"
        time.sleep(0.5)
    time.sleep(3)  # a requeue (the bug this guards against) would show by now
    info = slurm_cluster.job(job_id)
    text = log.read_text()
    assert "TASK_GOT_TERM" in text and "not requeueing" in text and "requeueing; the next start" not in text, text
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info


def _start_fake_task(slurm_cluster, tmp_path, name: str) -> tuple[int, Path]:
    """A job whose task exits like a checkpointing trainer on SIGTERM (EXIT_PREEMPTED); (job id, log)."""
    from pretrain.engine.signals import EXIT_PREEMPTED

    task = tmp_path / "task.sh"
    task.write_text(f"#!/usr/bin/env bash\ntrap 'echo TASK_GOT_TERM; exit {EXIT_PREEMPTED}' TERM\n"
                    "echo TASK_STARTED\nsleep 300 & wait\n")
    task.chmod(0o755)
    job_id = slurm_cluster.sbatch("slurm/single_node.sbatch", "--command", str(task), options=_options(name, 1, tmp_path))
    log = tmp_path / f"{name}-{job_id}.out"
    deadline = time.monotonic() + 120
    while "TASK_STARTED" not in (log.read_text() if log.is_file() else ""):
        assert time.monotonic() < deadline, f"the task never started:\n{_tail(log)}"
        time.sleep(0.5)
    return job_id, log


def test_a_job_slurm_requeues_is_not_reported_as_cancelled(slurm_cluster, tmp_path):
    """`scontrol requeue` (or a requeueing preemption) also SIGTERMs the job: job.sh must say requeue."""
    job_id, log = _start_fake_task(slurm_cluster, tmp_path, "requeued")
    slurm_cluster.run("scontrol", "requeue", str(job_id))
    deadline = time.monotonic() + 120
    while "tasks exited with status" not in log.read_text():
        assert time.monotonic() < deadline, f"job.sh never saw its tasks end:\n{_tail(log)}"
        time.sleep(0.5)
    time.sleep(2)  # job.sh's last line
    text = log.read_text()
    slurm_cluster.run("scancel", str(job_id))  # it would start again and sleep
    assert "TASK_GOT_TERM" in text and "stopped by SLURM for a requeue (restart 1 follows)" in text, text
    assert "cancelled (SIGTERM)" not in text, text


def test_single_node_training_completes_with_checkpoint_and_mlflow(jobs):
    job = jobs["single"]
    _assert_completed(job)
    rows = _assert_trained(job["run_dir"])
    record = json.loads((job["run_dir"] / "mlflow_run.json").read_text())
    client = MlflowClient(record["tracking_uri"])
    assert record["tracking_uri"] == f"sqlite:///{job['run_dir'].resolve()}/mlflow.db"
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["system.world_size"] == "2"
    assert run.data.tags["system.slurm_job_id"] == str(job["id"])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in rows]


def test_multi_node_training_sends_metrics_to_the_mlflow_server(jobs, mlflow_server, slurm_cluster):
    job = jobs["multi"]
    _assert_completed(job)
    assert job["info"]["NodeList"] == "node[1-2]"
    rows = _assert_trained(job["run_dir"])
    log = job["log"].read_text()
    assert re.search(r"nodes node\[1-2\], 4 tasks, master 127\.0\.0\.1:\d+", log), log
    client = MlflowClient(mlflow_server)
    run = client.get_run(json.loads((job["run_dir"] / "mlflow_run.json").read_text())["run_id"])
    assert run.info.experiment_id == client.get_experiment_by_name("slurm-multi-node").experiment_id
    assert run.data.tags["system.world_size"] == "4"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(r["step"], r["loss"]) for r in rows]
    assert not (job["run_dir"] / "mlflow_pending.jsonl").exists()


def test_warning_signal_checkpoints_requeues_and_resumes(jobs):
    job, reference = jobs["preempt"], jobs["single"]
    _assert_completed(job)
    assert job["info"]["Restarts"] == "1", _tail(job["log"])
    log = job["log"].read_text()
    assert "restart 0] got SIGUSR1" in log and "tasks exited with status 99" in log and "requeueing" in log, log
    assert "exited unexpectedly" not in log, log  # no loader worker died of the signal
    preempted_at = int(re.search(r"checkpoint of step (\d+) saved", (job["run_dir"] / "train.log").read_text()).group(1))
    assert SIGNAL_AFTER_STEP <= preempted_at < STEPS
    assert (job["run_dir"] / "checkpoints" / f"step-{preempted_at:08d}").is_dir()
    assert re.search(rf"resumed from .*step-{preempted_at:08d} at step {preempted_at}", (job["run_dir"] / "train.log").read_text())
    # Same step count as the uninterrupted run, and the same losses step for step (exact resume).
    rows, ref_rows = _assert_trained(job["run_dir"]), _metrics(reference["run_dir"])
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-5)
    # One MLflow run across the restart, with every step once.
    record = json.loads((job["run_dir"] / "mlflow_run.json").read_text())
    client = MlflowClient(record["tracking_uri"])
    assert len(client.search_runs([record["experiment_id"]])) == 1
    assert [m.step for m in client.get_metric_history(record["run_id"], "loss")] == list(range(1, STEPS + 1))
    assert client.get_run(record["run_id"]).info.status == "FINISHED"
