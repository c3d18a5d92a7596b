"""`pretrain train` under DeepSpeed's own launcher (`deepspeed --num_gpus N --module pretrain train …`).

torchrun- and srun-started runs are tested elsewhere (tiny_runs, tests/system); this is the third
launcher the README names. On CPU, --num_gpus is the number of processes; the launcher appends
--local_rank=N to every process's arguments, which the CLI must accept.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from engine_launch import LAUNCHER_VARS, free_port


def test_deepspeed_launcher_trains_two_ranks_in_step(tiny_runs, tmp_path):
    base = tiny_runs["zero2"].run_dir.parent / "base.yaml"
    run_dir = tmp_path / "ds_launcher"
    launcher = Path(sys.executable).parent / "deepspeed"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pretrain", "train",
           str(base), "train.zero_stage=2", "train.steps=4", "train.checkpoint_every=4", f"train.run_dir={run_dir}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["step"] == 4
    assert [r["rank"] for r in summary["ranks"]] == [0, 1]  # two processes, not one trained twice
    assert len({r["param_digest"] for r in summary["ranks"]}) == 1  # and in sync
    meta = json.loads((run_dir / "checkpoints" / "step-00000004" / "meta.json").read_text())
    assert meta["world_size"] == 2
