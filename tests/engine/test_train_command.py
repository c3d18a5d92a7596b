"""`pretrain train` refuses inconsistent setups with one clear line, before any process starts training."""
import pytest
import torch.distributed as dist

from pretrain.cli import main
from pretrain.config import load_config, save_resolved
from pretrain.data.manifest import load_manifest, manifest_sha256
from pretrain.engine.trainer import load_run_inputs
from pretrain.targets.table import random_unit_table, save_target_table


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory):
    """(base config path, good table, table with one row too many) for the tiny dataset."""
    root = tmp_path_factory.mktemp("train_command")
    manifest = load_manifest(tiny_data.data_dir)
    meta = {"tokenizer_sha256": manifest["tokenizer_sha256"], "method": "random", "manifest_sha256": manifest_sha256(tiny_data.data_dir)}
    good, wrong = root / "good.safetensors", root / "wrong.safetensors"
    save_target_table(good, random_unit_table(manifest["vocab_size"], 16, seed=0), meta)
    save_target_table(wrong, random_unit_table(manifest["vocab_size"] + 1, 16, seed=0), meta)
    return save_resolved(tiny_data, root, name="base.yaml"), good, wrong, root


def run_train(capsys, *args):
    status = main(["train", *args])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("case, expected", [
    ("short_model", "hold sequences of 32 tokens but model.max_seq_len=16"),
    ("wrong_vocab", "has 1001 rows but the tokenizer has 1000 pieces"),
    ("wrong_dim", "has dim 16 but targets.dim=8"),
    ("zero3_pipeline", "needs train.zero_stage 0 or 1"),
    ("missing_table", "not found; build it with `pretrain targets`"),
])
def test_config_errors_are_one_line_before_training(setup, capsys, case, expected):
    base, good, wrong, root = setup
    common = [str(base), "targets.dim=16", f"targets.path={good}", f"train.run_dir={root / case}"]
    extra = {
        "short_model": ["model.max_seq_len=16"],
        "wrong_vocab": [f"targets.path={wrong}"],
        "wrong_dim": ["targets.dim=8"],
        "zero3_pipeline": ["train.zero_stage=3", "train.pipeline_stages=2"],
        "missing_table": [f"targets.path={root / 'nope.safetensors'}"],
    }[case]
    status, err = run_train(capsys, *common, *extra)
    assert status == 1
    assert err.startswith("pretrain train: error:") and expected in err and "Traceback" not in err
    assert not dist.is_initialized()  # nothing was started
    assert not (root / case).exists()  # and nothing written


def test_resume_refuses_another_world_size_and_a_missing_checkpoint(tiny_runs, capsys, tmp_path):
    run = tiny_runs["zero2"]
    before = (run.run_dir / "metrics.jsonl").read_text()
    status, err = run_train(capsys, str(run.run_dir / "config.resolved.yaml"))
    assert status == 1 and "was written by 2 processes; this job has 1" in err
    assert (run.run_dir / "metrics.jsonl").read_text() == before
    status, err = run_train(capsys, str(run.run_dir / "config.resolved.yaml"), f"train.run_dir={tmp_path}", "--resume")
    assert status == 1 and "--resume: no complete checkpoint" in err


def test_a_table_with_swapped_rows_is_refused_before_training(setup, capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    from pretrain.targets.table import TENSOR_NAME, read_table_meta

    base, good, _, _ = setup
    table = load_file(good)[TENSOR_NAME]
    table[[3, 4]] = table[[4, 3]]  # still unit rows, same metadata
    damaged = tmp_path / "damaged.safetensors"
    save_file({TENSOR_NAME: table}, str(damaged), metadata=read_table_meta(good))
    status, err = run_train(capsys, str(base), "targets.dim=16", f"targets.path={damaged}", f"train.run_dir={tmp_path / 'run'}")
    assert status == 1 and f"{damaged}: its values do not match the sha256" in err
    assert not (tmp_path / "run").exists()


def test_softmax_head_needs_no_target_table(setup):
    base, _, _, root = setup
    cfg = load_config(base, ["model.head=softmax", "model.init_embeddings_from_targets=false", f"targets.path={root / 'absent.safetensors'}"])
    inputs = load_run_inputs(cfg, world_size=1)
    assert inputs.table is None and inputs.vocab_size == 1000 and "targets_sha256" not in inputs.hashes


def test_a_finished_run_shuts_its_process_group_down(setup, tmp_path):
    """Left to interpreter teardown, gloo threads can abort a finished rank (exit 134 under srun)."""
    import os
    import subprocess
    import sys

    from engine_launch import LAUNCHER_VARS

    base, good, _, _ = setup
    args = ["train", str(base), "targets.dim=16", f"targets.path={good}", f"train.run_dir={tmp_path / 'run'}",
            "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "train.steps=2",
            "train.checkpoint_every=2", "train.progress=false", "tracking.enabled=false"]
    script = ("import sys, torch.distributed as dist; from pretrain.cli import main; "
              f"status = main({args!r}); print('status', status, 'initialized', dist.is_initialized())")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "status 0 initialized False" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


def test_a_second_job_in_a_run_directory_is_refused_naming_the_first(setup, tmp_path):
    """Two jobs in one directory interleaved their metrics and overwrote each other's checkpoints."""
    import os
    import subprocess
    import sys

    from engine_launch import LAUNCHER_VARS, hold_run_lock

    base, good, _, _ = setup
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = hold_run_lock(run_dir, job_id="777")
    args = ["train", str(base), "targets.dim=16", f"targets.path={good}", f"train.run_dir={run_dir}",
            "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "train.steps=2",
            "train.progress=false", "tracking.enabled=false", "data.loader_workers=0"]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    try:
        result = subprocess.run([sys.executable, "-m", "pretrain", *args], env=env, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"{run_dir} is in use by another training job" in result.stderr and f"pid {holder.pid}, job SLURM_JOB_ID=777" in result.stderr
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.resolved.yaml").exists()


def test_a_skipped_corrupt_shard_is_in_the_log_the_metrics_the_summary_and_mlflow(setup, tiny_data, tmp_path):
    """Before, a skipped shard showed only as a loader worker's console line."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from engine_launch import LAUNCHER_VARS, metrics_rows
    from mlflow import MlflowClient

    from pretrain.data.stream import build_loader

    base, good, _, _ = setup
    data_copy = shutil.copytree(tiny_data.data_dir, tmp_path / "data")
    spec = build_loader(data_copy, "train", batch_size=8, rank=0, world_size=1, num_workers=0,
                        seed=load_config(base).data.seed).spec
    bad_name = spec.shards[spec.worker_shards(0, 0)[0]]["name"]  # the first shard this run reads
    bad = data_copy / bad_name
    payload = bytearray(bad.read_bytes())
    payload[2000] ^= 0xFF  # fails its checksum
    bad.write_bytes(bytes(payload))
    run_dir = tmp_path / "run"
    args = ["train", str(base), f"data.dir={data_copy}", "data.on_corrupt_shard=skip", "data.loader_workers=0",
            "targets.dim=16", f"targets.path={good}", f"train.run_dir={run_dir}", "model.d_model=32", "model.n_layers=1",
            "model.n_heads=2", "model.d_ff=64", "train.steps=3", "train.log_every=1", "train.micro_batch_size=8",
            "train.progress=false"]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    result = subprocess.run([sys.executable, "-m", "pretrain", *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped corrupt shard {bad_name} (rank 0, epoch 0, 256 samples" in (run_dir / "train.log").read_text()
    assert [r["skipped_shards"] for r in metrics_rows(run_dir)] == [1, 1, 1]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["skipped_shards"] == 1 and summary["skipped_samples"] == 256
    record = json.loads((run_dir / "mlflow_run.json").read_text())
    history = MlflowClient(record["tracking_uri"]).get_metric_history(record["run_id"], "skipped_shards")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 1.0), (3, 1.0)]


def test_steps_replayed_after_a_crash_reach_mlflow_once(setup, tmp_path):
    """SIGKILL after step 3 (checkpoint at 2): the resumed run replays step 3; MLflow shows it once."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from engine_launch import LAUNCHER_VARS, metrics_rows
    from mlflow import MlflowClient

    from pretrain.engine.trainer import PAUSE_ENV

    base, good, _, _ = setup
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain", "train", str(base), "targets.dim=16", f"targets.path={good}",
           f"train.run_dir={run_dir}", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
           "train.steps=4", "train.checkpoint_every=2", "train.log_every=1", "train.micro_batch_size=8",
           "train.progress=false", "data.loader_workers=0"]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    first = subprocess.Popen(cmd, env={**env, PAUSE_ENV: "3"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
    deadline = time.monotonic() + 240
    while not any(r["step"] == 3 for r in metrics_rows(run_dir)):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()[-3000:]
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in (run_dir / "train.log").read_text()
    record = json.loads((run_dir / "mlflow_run.json").read_text())
    history = MlflowClient(record["tracking_uri"]).get_metric_history(record["run_id"], "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert [r["loss"] for r in metrics_rows(run_dir)] == [m.value for m in sorted(history, key=lambda m: m.step)]
