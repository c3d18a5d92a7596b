"""Training with several processes: ZeRO stages, pipeline, checkpoints, exact resume, signals, NaN guard.

The five runs of the `tiny_runs` fixture (2 processes each, trained once per session) are checked
here; the other tests start their own 2-process jobs (see conftest.launch).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from engine_launch import launch, metrics_rows, wait_for_step
from safetensors.torch import load_file

from pretrain.engine import checkpoint as ckpt
from pretrain.engine.checkpoint import load_model_state
from pretrain.engine.guards import EXIT_DIVERGED, NAN_ENV
from pretrain.engine.signals import EXIT_PREEMPTED
from pretrain.engine.trainer import PAUSE_ENV
from pretrain.model import build_model
from pretrain.targets.table import load_target_table

pytestmark = pytest.mark.multiproc
RUN_NAMES = ["zero0", "zero1", "zero2", "zero3", "softmax", "pipeline", "learned"]
PER_STEP = ("loss", "lr", "grad_norm", "mean_cos", "mean_pred_norm", "data_fingerprint", "samples_seen")


@pytest.mark.parametrize("name", RUN_NAMES)
def test_tiny_run_trains_and_ranks_stay_in_sync(tiny_runs, name):
    run = tiny_runs[name]
    rows = metrics_rows(run.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 17))
    required = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "samples_seen", "peak_mem_mb"}
    if run.cfg.model.head == "continuous":
        required |= {"mean_cos", "mean_pred_norm"}
    assert all(required <= r.keys() and all(r[k] is not None for k in required) for r in rows)
    first, last = sum(r["loss"] for r in rows[:4]) / 4, sum(r["loss"] for r in rows[-4:]) / 4
    assert last < first - 0.02, f"{name}: loss did not decrease ({first:.4f} -> {last:.4f})"
    assert rows[-1]["samples_seen"] == 16 * run.cfg.train.micro_batch_size * run.cfg.train.grad_accum * (1 if name == "pipeline" else 2)
    summary = json.loads((run.run_dir / "train_summary.json").read_text())
    by_stage = {}
    for entry in summary["ranks"]:
        by_stage.setdefault(entry["stage"], set()).add(entry["param_digest"])
    assert all(len(digests) == 1 for digests in by_stage.values()), summary["ranks"]
    assert len(by_stage) == (2 if name == "pipeline" else 1)
    for item in ("config.resolved.yaml", "train.log", "metrics.jsonl"):
        assert (run.run_dir / item).is_file()
    ckpt_dir = run.run_dir / ckpt.CHECKPOINTS
    assert ckpt.complete_tags(ckpt_dir) == ["step-00000008", "step-00000016"]
    assert (ckpt_dir / ckpt.LATEST).read_text() == "step-00000016"


def test_zero2_and_zero3_train_the_same_model(tiny_runs):
    """Same data, same initial weights: the sharding must not change the numbers (beyond rounding)."""
    zero2, zero3 = (metrics_rows(tiny_runs[n].run_dir) for n in ("zero2", "zero3"))
    assert [r["data_fingerprint"] for r in zero2] == [r["data_fingerprint"] for r in zero3]
    for a, b in zip(zero2, zero3):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


@pytest.mark.parametrize("name", RUN_NAMES)
def test_load_model_state_gives_the_plain_model(tiny_runs, name):
    run = tiny_runs[name]
    state, cfg, meta = load_model_state(run.run_dir)
    assert meta["step"] == 16 and cfg.model == run.cfg.model
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    table, _ = load_target_table(meta.get("targets_path") or cfg.targets_path)
    model = build_model(cfg, meta["vocab_size"], table if cfg.reads_target_table else None)
    model.load_state_dict(state, strict=True)
    earlier, _, _ = load_model_state(run.run_dir / ckpt.CHECKPOINTS, tag="step-00000008")
    assert not torch.equal(earlier["encoder.embed.tok_emb.weight"], state["encoder.embed.tok_emb.weight"])
    ids = torch.randint(5, meta["vocab_size"], (2, cfg.data.seq_len))
    assert torch.isfinite(model.predict(ids)).all()


def test_zero0_bf16_consolidates_to_the_fp32_master_weights(tiny_runs):
    state, _, _ = load_model_state(tiny_runs["zero0"].run_dir)
    saved = torch.load(tiny_runs["zero0"].run_dir / ckpt.CHECKPOINTS / "step-00000016" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=True)["module"]
    assert saved.keys() == state.keys()
    for key, bf16 in saved.items():  # the bf16 weights are the masters rounded, the masters are finer
        assert bf16.dtype == torch.bfloat16 and torch.equal(state[key].to(torch.bfloat16), bf16)
    assert any(not torch.equal(state[k], saved[k].float()) for k in saved)


def test_learned_targets_train_and_are_saved_with_each_checkpoint(tiny_runs):
    run = tiny_runs["learned"]
    rows = metrics_rows(run.run_dir)
    assert all(r["targets/effective_rank"] > 1 for r in rows)
    state, cfg, meta = load_model_state(run.run_dir)
    assert meta["targets_path"] == str(run.run_dir / ckpt.CHECKPOINTS / "step-00000016" / "targets.safetensors")
    learned, table_meta = load_target_table(meta["targets_path"], vocab_size=meta["vocab_size"])
    assert table_meta["method"] == "learned"
    torch.testing.assert_close(learned, torch.nn.functional.normalize(state["learned_targets.weight"], dim=1))
    initial, _ = load_target_table(cfg.targets_path)
    assert not torch.allclose(learned, initial)  # the table moved


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_deepspeed_zero_to_fp32_consolidates_our_checkpoints(tiny_runs, name, tmp_path):
    ckpt_dir = tiny_runs[name].run_dir / ckpt.CHECKPOINTS
    result = subprocess.run([sys.executable, str(ckpt_dir / "zero_to_fp32.py"), str(ckpt_dir), str(tmp_path),
                             "--safe_serialization"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    consolidated = load_file(str(tmp_path / "model.safetensors"))
    ours, _, _ = load_model_state(tiny_runs[name].run_dir)
    assert consolidated.keys() == ours.keys()
    assert all(torch.equal(consolidated[k], ours[k]) for k in ours)


def test_exact_resume_after_a_crash_in_save_and_a_sigkill(engine_base, tiny_runs, tmp_path):
    """Crash while saving step 8, resume, SIGKILL at step 11, resume: the same 16 steps as uninterrupted."""
    base, runs = engine_base
    run_dir = tmp_path / "run"
    args = ["train", str(base), *runs["zero2"], f"train.run_dir={run_dir}", "train.run_name=zero2",
            "train.checkpoint_every=4"]
    ckpt_dir = run_dir / ckpt.CHECKPOINTS

    job = launch(args, 2, tmp_path / "a", env={ckpt.CRASH_ENV: "8"})
    assert job.wait() == [-signal.SIGKILL] * 2, job.output()
    job.kill()
    assert (ckpt_dir / ckpt.LATEST).read_text() == "step-00000004"
    assert (ckpt_dir / ("step-00000008" + ckpt.PARTIAL) / "rank_00001.json").is_file()
    assert load_model_state(run_dir)[2]["step"] == 4  # the previous checkpoint is intact

    job = launch(args, 2, tmp_path / "b", env={PAUSE_ENV: "11"})
    wait_for_step(job, run_dir, 11)
    job.kill()
    assert (ckpt_dir / ckpt.LATEST).read_text() == "step-00000008"
    assert not list(ckpt_dir.glob("*" + ckpt.PARTIAL))

    job = launch(args, 2, tmp_path / "c")
    assert job.wait() == [0, 0], job.output()
    resumed, reference = metrics_rows(run_dir), metrics_rows(tiny_runs["zero2"].run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 17))
    for ours, theirs in zip(resumed, reference):
        assert {k: ours[k] for k in PER_STEP} == {k: theirs[k] for k in PER_STEP}, f"step {ours['step']}"
    assert ckpt.complete_tags(ckpt_dir) == ["step-00000012", "step-00000016"]
    assert "resumed from" in (run_dir / "train.log").read_text()


def test_a_signal_to_one_rank_checkpoints_every_rank_under_srun(engine_base, tmp_path):
    base, runs = engine_base
    run_dir = tmp_path / "run"
    job = launch(["train", str(base), *runs["zero2"], f"train.run_dir={run_dir}", "train.steps=100000",
                  "train.checkpoint_every=100000"], 2, tmp_path / "logs", slurm=True)
    wait_for_step(job, run_dir, 3)
    os.killpg(job.procs[1].pid, signal.SIGUSR1)  # rank 1 and its DataLoader worker, as SLURM signals a task
    assert job.wait() == [EXIT_PREEMPTED] * 2, job.output()
    job.kill()
    last = metrics_rows(run_dir)[-1]["step"]
    tag = (run_dir / ckpt.CHECKPOINTS / ckpt.LATEST).read_text()
    assert tag == ckpt.tag_for_step(last)
    meta = ckpt.read_meta(run_dir / ckpt.CHECKPOINTS / tag)
    assert meta["step"] == last and meta["world_size"] == 2
    assert all(ckpt.read_rank_state(run_dir / ckpt.CHECKPOINTS / tag, r)["rank"] == r for r in (0, 1))
    assert "via slurm, master localhost" in job.output()


def test_nan_steps_are_skipped_and_too_many_in_a_row_stop_the_run(engine_base, tmp_path):
    base, runs = engine_base
    run_dir = tmp_path / "run"
    job = launch(["train", str(base), *runs["zero3"], f"train.run_dir={run_dir}", "train.checkpoint_every=4",
                  "train.max_bad_steps_in_row=2", "tracking.enabled=true"], 2, tmp_path / "logs",
                 env={NAN_ENV: "3,5,6"})
    assert job.wait() == [EXIT_DIVERGED] * 2, job.output()
    rows = {r["step"]: r for r in metrics_rows(run_dir)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert [rows[s]["skipped"] for s in range(1, 7)] == [False, False, True, False, True, True]
    assert rows[3]["loss"] is None and rows[4]["loss"] is not None and rows[6]["bad_steps"] == 3
    ckpt_dir = run_dir / ckpt.CHECKPOINTS
    assert ckpt.complete_tags(ckpt_dir) == ["step-00000004", "step-00000006"]
    before, _, _ = load_model_state(ckpt_dir, tag="step-00000004")
    after, _, meta = load_model_state(ckpt_dir, tag="step-00000006")
    assert all(torch.equal(before[k], after[k]) for k in before)  # steps 5 and 6 changed nothing
    assert meta["guard"] == {"in_row": 2, "total": 3}
    train_log = (run_dir / "train.log").read_text()
    assert "training stopped at step 6" in train_log
    # The guard's checkpoint is marked; a rerun resumes from the healthy one, as the message says.
    assert ckpt.is_diverged(ckpt_dir / "step-00000006") and not ckpt.is_diverged(ckpt_dir / "step-00000004")
    assert (ckpt_dir / ckpt.LATEST).read_text() == "step-00000004"
    assert f"rerun the same command: it resumes from the last healthy checkpoint {ckpt_dir / 'step-00000004'}" in train_log
    assert (run_dir / "mlflow_run.json").is_file()  # the tracker ran on rank 0


def test_a_damaged_checkpoint_is_one_clear_line_for_export_and_eval(tiny_runs, tmp_path, capsys):
    import shutil

    from pretrain.cli import main

    run_dir = shutil.copytree(tiny_runs["zero2"].run_dir, tmp_path / "run")
    tag_dir = run_dir / ckpt.CHECKPOINTS / "step-00000016"
    (tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert main(["export", str(run_dir), str(tmp_path / "export")]) == 1
    err = capsys.readouterr().err
    assert f"{tag_dir}/zero_pp_rank_1_mp_rank_00_optim_states.pt missing" in err and "--tag" in err and "Traceback" not in err
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    assert main(["eval", str(run_dir / "config.resolved.yaml"), "tracking.enabled=false", "--run-dir", str(run_dir)]) == 1
    assert f"{model_file} does not match the sha256" in capsys.readouterr().err
    assert main(["export", str(run_dir), str(tmp_path / "export"), "--tag", "step-00000008"]) == 0  # the way back works


def _launch_resume(config: str, run_dir) -> tuple[int, str]:
    """`pretrain launch --nproc-per-node 2 train` on a run directory: (exit status, its output)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pretrain", "launch", "--nproc-per-node", "2", "train", config,
                           f"train.run_dir={run_dir}", "tracking.enabled=false"],
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_flipped_tensor_bytes_or_an_edited_data_position_stop_resume_and_export(tiny_runs, tmp_path, capsys):
    """Files that still load but differ from what was saved: refused by the checksums in meta.json."""
    import shutil

    from pretrain.cli import main

    run_dir = shutil.copytree(tiny_runs["zero2"].run_dir, tmp_path / "run")
    tag_dir = run_dir / ckpt.CHECKPOINTS / "step-00000016"
    config = str(run_dir / "config.resolved.yaml")
    optim = tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    original = optim.read_bytes()
    data = bytearray(original)
    for offset in range(len(data) // 2, len(data) // 2 + 400, 4):  # 100 values in the middle of the tensor data
        data[offset] ^= 0x01
    optim.write_bytes(bytes(data))
    ckpt.verify_deepspeed_files(tag_dir)  # still loads: only the checksum can tell
    assert main(["export", str(run_dir), str(tmp_path / "export")]) == 1
    assert f"{optim} does not match the sha256 recorded in {tag_dir / ckpt.META}" in capsys.readouterr().err
    # Resume, as written (2 processes): each rank hashes a share of the files, and all refuse together.
    rc, output = _launch_resume(config, run_dir)
    assert rc != 0 and f"{optim} does not match the sha256" in output
    optim.write_bytes(original)

    position = tag_dir / ckpt.rank_file(1)
    state = json.loads(position.read_text())
    state["data"]["workers"][0]["cursor"] += 1  # skip a shard: still a valid position
    position.write_text(json.dumps(state))
    rc, output = _launch_resume(config, run_dir)
    assert rc != 0 and f"{position} does not match the sha256" in output and "Traceback" not in output
    assert not (tmp_path / "export").exists()


def test_ranks_checkpoint_and_stop_when_their_torchrun_agent_dies(engine_base, tmp_path):
    """Killing only the agent left the ranks training unsupervised (and a relaunch joined them)."""
    import psutil
    from engine_launch import LAUNCHER_VARS

    base, runs = engine_base
    run_dir = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "torchrun.log", "w") as out:
        agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                  "-m", "pretrain", "train", str(base), *runs["zero2"], f"train.run_dir={run_dir}",
                                  "train.steps=100000", "train.checkpoint_every=100000"],
                                 env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not any(r["step"] >= 3 for r in metrics_rows(run_dir)):
            assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "torchrun.log").read_text()[-3000:]
            time.sleep(0.2)
        ranks = psutil.Process(agent.pid).children()
        agent.kill()  # the agent alone
        agent.wait()
        _, alive = psutil.wait_procs(ranks, timeout=120)
    finally:
        try:
            os.killpg(agent.pid, signal.SIGKILL)  # whatever is left of the job
        except ProcessLookupError:
            pass
    assert not alive, "ranks still training after their agent died"
    last = metrics_rows(run_dir)[-1]["step"]
    assert (run_dir / ckpt.CHECKPOINTS / ckpt.LATEST).read_text() == ckpt.tag_for_step(last)
    assert f"preempted: checkpoint of step {last} saved" in (run_dir / "train.log").read_text()
