"""Guards: skip NaN/inf steps and stop after too many in a row; refuse inconsistent inputs early.

Skipping: GuardedAdamW is torch's AdamW that, before updating, checks its gradients for NaN/inf
and agrees with every other rank (an all-reduce of one flag): if any rank saw one, no rank updates
weights or moments. It is the optimizer DeepSpeed's ZeRO / bf16 wrappers call, so the check sees
exactly what would be applied, in every ZeRO stage and in the pipeline. The step still counts (the
batch is consumed and the learning-rate schedule moves on).

Test-only hook: PRETRAIN_TEST_NAN_STEPS="3,6,7" makes one rank's loss NaN at those steps (rank 0, or
with pipeline stages the last stage of the first replica).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from pretrain.config import Config, ConfigError

log = logging.getLogger(__name__)

EXIT_DIVERGED = 3
NAN_ENV = "PRETRAIN_TEST_NAN_STEPS"


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips the whole update (on every rank) when any gradient is not finite."""

    skipped_last_step = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if self.skip_for_bad_gradients(grads):
            return None
        return super().step(closure)

    def skip_for_bad_gradients(self, grads: list[torch.Tensor]) -> bool:
        """True (on every rank alike) when any rank's gradients hold NaN/inf; sets skipped_last_step."""
        bad = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
        if grads:
            bad = (~torch.isfinite(torch.stack(torch._foreach_norm(grads)))).any().float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.skipped_last_step = bool(bad.item())
        return self.skipped_last_step


def nan_test_steps() -> set[int]:
    raw = os.environ.get(NAN_ENV, "").strip()
    return {int(s) for s in raw.split(",") if s.strip()} if raw else set()


class BadStepGuard:
    """Counts skipped steps; says when max_in_row consecutive ones mean the run has diverged."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0

    def update(self, bad: bool) -> bool:
        """Record one step; True when the run must stop."""
        if bad:
            self.in_row += 1
            self.total += 1
        else:
            self.in_row = 0
        return self.in_row >= self.max_in_row

    def state_dict(self) -> dict:
        return {"in_row": self.in_row, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.in_row, self.total = int(state["in_row"]), int(state["total"])


# Inputs that must agree before any training starts ---------------------------------------------------

def check_run_inputs(cfg: Config, manifest: dict, *, tokenizer_pieces: int, tokenizer_sha256: str,
                     table_shape: tuple[int, int] | None, table_meta: dict | None, world_size: int) -> None:
    """Raise ConfigError naming the mismatch and the fix; every rank runs it on the same files."""
    data_dir = cfg.data_dir
    vocab = manifest["vocab_size"]
    seq_len = manifest["seq_len"]
    if tokenizer_pieces != vocab:
        raise ConfigError(f"{data_dir}/tokenizer.model has {tokenizer_pieces} pieces but {data_dir}/manifest.json says "
                          f"vocab_size={vocab}: the data directory is inconsistent; rerun `pretrain prepare`")
    if manifest.get("tokenizer_sha256") and manifest["tokenizer_sha256"] != tokenizer_sha256:
        raise ConfigError(f"{data_dir}/tokenizer.model is not the tokenizer the shards were made with (sha256 differs "
                          f"from manifest.json); rerun `pretrain prepare`")
    if seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"the shards in {data_dir} hold sequences of {seq_len} tokens but model.max_seq_len="
                          f"{cfg.model.max_seq_len}; set model.max_seq_len={seq_len} (or more), or prepare the data "
                          f"with data.seq_len<={cfg.model.max_seq_len}")
    if cfg.data.seq_len != seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} but the shards in {data_dir} were prepared with seq_len "
                          f"{seq_len}; set data.seq_len={seq_len} or rerun `pretrain prepare`")
    if table_shape is not None:
        rows, dim = table_shape
        if rows != vocab:
            raise ConfigError(f"target table {cfg.targets_path} has {rows} rows but the tokenizer has {vocab} pieces; "
                              "rebuild it with `pretrain targets` for this dataset")
        if table_meta and table_meta.get("tokenizer_sha256") not in (None, tokenizer_sha256):
            raise ConfigError(f"target table {cfg.targets_path} was built for another tokenizer (sha256 mismatch); "
                              "rebuild it with `pretrain targets` for this dataset")
        if dim != cfg.targets.dim:
            raise ConfigError(f"target table {cfg.targets_path} has dim {dim} but targets.dim={cfg.targets.dim}; "
                              f"set targets.dim={dim} or rebuild the table")
    stages = cfg.train.pipeline_stages
    if world_size % stages:
        raise ConfigError(f"train.pipeline_stages={stages} does not divide the {world_size} processes of this job")
