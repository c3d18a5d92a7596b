"""Tiny trained runs for the tests of every area (the `tiny_runs` session fixture in tests/conftest.py).

    python tests/engine/tiny_runs.py OUT_DIR DATA_CONFIG.yaml

writes a random target table and OUT_DIR/base.yaml (the tiny_data config + a tiny model), then
trains every run of RUNS under torchrun with 2 processes, one after the other inside the same two
processes (DeepSpeed and torch start once). Each run lands in OUT_DIR/<name>/.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

NPROC = 2
# Shared by every run; the tiny_data config supplies data paths, vocabulary and seq_len.
COMMON = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.mask_prob=0.25",
    "targets.dim=16", "targets.method=random", "loss.name=vmf_practice",
    "train.steps=16", "train.micro_batch_size=8", "train.lr=3e-3", "train.warmup_steps=2",
    "train.checkpoint_every=8", "train.keep_last=2", "train.log_every=1", "train.progress=false",
    "tracking.enabled=false",
]
RUNS = {
    "zero2": ["train.zero_stage=2"],
    "zero3": ["train.zero_stage=3"],
    "softmax": ["train.zero_stage=2", "model.head=softmax"],
    "zero1": ["train.zero_stage=1", "model.objective=causal", "train.grad_accum=2", "train.precision=bf16"],
    "zero0": ["train.zero_stage=0", "train.precision=bf16"],
    # Row-sparse input embedding and learned target table (lazy row AdamW on both).
    "sparse": ["train.zero_stage=0", "train.sparse_embedding=true", "model.objective=causal", "targets.learned=true",
               "targets.contrastive_negatives=64"],
    "learned": ["train.zero_stage=3", "targets.learned=true", "targets.learned_remedy=contrastive",
                "targets.contrastive_negatives=64"],
    # model.input_embedding=targets (the frozen table through an adapter) under ZeRO-2, ZeRO-3 + bf16, with learned targets.
    "table_input": ["train.zero_stage=2", "model.input_embedding=targets"],
    "table_input_softmax": ["train.zero_stage=3", "train.precision=bf16", "model.head=softmax", "model.input_embedding=targets"],
    "table_input_learned": ["train.zero_stage=3", "model.input_embedding=targets", "targets.learned=true",
                            "targets.contrastive_negatives=64"],
    # Last: a pipeline engine leaves DeepSpeed's global model-parallel groups set for later engines.
    "pipeline": ["train.zero_stage=1", "train.pipeline_stages=2", "train.grad_accum=2"],
    "table_input_pipeline": ["train.zero_stage=1", "train.pipeline_stages=2", "train.grad_accum=2", "model.input_embedding=targets"],
}


def run_overrides(out_dir: Path, name: str) -> list[str]:
    return [*RUNS[name], f"train.run_dir={out_dir / name}", f"train.run_name={name}"]


def prepare(out_dir: Path, data_config: Path) -> Path:
    """The target table and base.yaml (tiny_data's config with COMMON applied)."""
    from pretrain.config import load_config, save_resolved
    from pretrain.data.manifest import load_manifest, manifest_sha256
    from pretrain.targets.table import random_unit_table, save_target_table

    targets = out_dir / "targets.safetensors"
    cfg = load_config(data_config, [*COMMON, f"targets.path={targets}"])
    manifest = load_manifest(cfg.data_dir)
    save_target_table(targets, random_unit_table(manifest["vocab_size"], cfg.targets.dim, seed=0),
                      {"tokenizer_sha256": manifest["tokenizer_sha256"], "method": "random",
                       "manifest_sha256": manifest_sha256(cfg.data_dir)})
    return save_resolved(cfg, out_dir, name="base.yaml")


def train_all(out_dir: Path) -> int:
    """Under torchrun: every run in turn."""
    from pretrain.config import load_config
    from pretrain.engine.trainer import Trainer

    for name in RUNS:
        status = Trainer(load_config(out_dir / "base.yaml", run_overrides(out_dir, name))).run()
        if status:
            return status
    return 0


def launch(out_dir: Path, data_config: Path) -> None:
    prepare(out_dir, data_config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
           __file__, "--train", str(out_dir)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise RuntimeError(f"tiny runs failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    (out_dir / "runs.json").write_text(json.dumps({name: str(out_dir / name) for name in RUNS}))


if __name__ == "__main__":
    if sys.argv[1] == "--train":
        sys.exit(train_all(Path(sys.argv[2])))
    launch(Path(sys.argv[1]), Path(sys.argv[2]))
