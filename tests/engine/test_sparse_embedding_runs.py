"""train.sparse_embedding under DeepSpeed (ZeRO-0, 2 processes): ranks in sync, exact resume."""
import json

import pytest
from engine_launch import assert_resumes_exactly_from_step_8, launch, metrics_rows

from pretrain.engine import checkpoint as ckpt
from pretrain.engine.checkpoint import load_model_state

pytestmark = pytest.mark.multiproc
PER_STEP = ("loss", "lr", "grad_norm", "mean_cos", "data_fingerprint", "samples_seen")


def test_sparse_run_trains_in_sync_and_consolidates(tiny_runs):
    run_dir = tiny_runs["sparse"].run_dir
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(r["grad_norm"] > 0 and not r["skipped"] for r in rows)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert len({r["param_digest"] for r in summary["ranks"]}) == 1  # the sparse all-reduce kept ranks equal
    state, cfg, _ = load_model_state(run_dir)
    assert cfg.train.sparse_embedding and cfg.targets.learned and "encoder.embed.tok_emb.weight" in state
    earlier, _, _ = load_model_state(run_dir / ckpt.CHECKPOINTS, tag="step-00000008")
    moved = (earlier["learned_targets.weight"] != state["learned_targets.weight"]).any(dim=1)
    assert 0 < int(moved.sum()) < moved.numel()  # the lazy row update moved the rows read, not all V


def test_sparse_run_resumes_exactly_from_its_step_8_checkpoint(engine_base, tiny_runs, tmp_path):
    """Steps 9-16 after a resume from step 8 (weights, lazy moments, step counts) equal the uninterrupted run's."""
    base, runs = engine_base
    assert_resumes_exactly_from_step_8(base, runs["sparse"], tiny_runs["sparse"].run_dir, tmp_path, PER_STEP)


def test_one_process_sparse_run_trains_without_deepspeeds_self_allreduce(engine_base, tmp_path):
    """World size 1, ZeRO-0: DeepSpeed's backward all-reduce is off (optim.skip_single_replica_allreduce);
    the sparse gradient reaches the row optimizer uncoalesced and the run still learns."""
    base, runs = engine_base
    run_dir = tmp_path / "one"
    job = launch(["train", str(base), *runs["sparse"], f"train.run_dir={run_dir}", "train.run_name=one", "train.steps=6",
                  "train.checkpoint_every=6"], 1, tmp_path / "logs")
    assert job.wait() == [0], job.output()
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[-1]["loss"] < rows[0]["loss"]
    assert all(r["grad_norm"] > 0 and not r["skipped"] for r in rows)
