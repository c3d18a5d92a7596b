"""Learned targets: the target table is a trainable parameter, kept from collapsing.

With a plain cosine loss between a prediction and a *trainable* row, the trivial minimum is every
row equal to one vector (and every prediction equal to it): rows are pulled toward the model's
averaged predictions, which are pulled toward the rows, and the table contracts to a line.
Remedies (targets.learned_remedy):
- contrastive (default): InfoNCE between the prediction and candidate rows - the batch's own target
  ids plus `negatives` ids sampled uniformly - so rows are also pushed apart. Cost O(N x candidates),
  independent of the vocabulary size.
- vicreg: on those same candidate rows, a variance hinge (each dimension's std across rows >= that of
  an isotropic table) and a covariance penalty (off-diagonal covariances -> 0), as in VICReg.
- ema: the loss compares predictions with a slowly updated EMA copy of the table (stop-gradient);
  the table itself chases the stop-gradient predictions (BYOL / EMA-codebook style). This slows the
  collapse but does not remove its cause; see tests/targets/test_learned_targets.py for measured numbers.
- none: the naive setting, kept to demonstrate the collapse.

Engine usage (docs/INTERFACES.md):
    lt = LearnedTargets.from_config(cfg.targets, init_table, sparse_grad=cfg.train.sparse_embedding)  # a submodule
    rows, local_ids = lt.rows_for_loss(ids)  # only the distinct target rows; the margin loss: lt.table_for_loss()
    loss = continuous_loss(pred, local_ids, rows, kind) + lt.extra_loss(pred, ids, ignore_index)
    ... optimizer.step(); lt.after_step()
    log(lt.diagnostics())
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import TargetsConfig
from pretrain.targets import diagnostics as diag

REMEDIES = ("none", "contrastive", "ema", "vicreg")


class LearnedTargets(nn.Module):
    def __init__(
        self,
        init_table: torch.Tensor,
        remedy: str = "contrastive",
        *,
        lr_scale: float = 1.0,
        contrastive_weight: float = 1.0,
        temperature: float = 0.1,
        negatives: int = 1024,
        vicreg_weight: float = 1.0,
        ema_decay: float = 0.99,
        sparse_grad: bool = False,
    ):
        super().__init__()
        if remedy not in REMEDIES:
            raise ValueError(f"targets.learned_remedy={remedy!r}; choose one of {REMEDIES}")
        if init_table.ndim != 2:
            raise ValueError(f"learned targets need an initial [V, D] table, got shape {tuple(init_table.shape)}")
        self.remedy = remedy
        self.lr_scale = lr_scale
        self.contrastive_weight = contrastive_weight
        self.temperature = temperature
        self.negatives = negatives
        self.vicreg_weight = vicreg_weight
        self.ema_decay = ema_decay
        self.sparse_grad = sparse_grad
        init = F.normalize(init_table.detach().to(torch.float32), dim=1)
        self.weight = nn.Parameter(init.clone())
        if remedy == "ema":
            self.register_buffer("ema", init.clone())

    @classmethod
    def from_config(cls, tcfg: TargetsConfig, init_table: torch.Tensor, sparse_grad: bool = False) -> "LearnedTargets":
        return cls(
            init_table, tcfg.learned_remedy, lr_scale=tcfg.learned_lr_scale, contrastive_weight=tcfg.contrastive_weight,
            temperature=tcfg.contrastive_temperature, negatives=tcfg.contrastive_negatives,
            vicreg_weight=tcfg.vicreg_weight, ema_decay=tcfg.ema_decay, sparse_grad=sparse_grad,
        )

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def unit_table(self) -> torch.Tensor:
        """The trainable table with unit rows (differentiable)."""
        return F.normalize(self.weight, dim=1)

    def unit_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """unit_table()[ids] (differentiable), without normalising the other V rows. With sparse_grad
        the table's gradient is row-sparse (the rows read), for the optimizer's lazy row update."""
        return F.normalize(F.embedding(ids, self.weight, sparse=self.sparse_grad), dim=1)

    def table_for_loss(self) -> torch.Tensor:
        """The whole table the continuous loss compares predictions against: unit rows [V, D] (the EMA
        copy, without gradient, for the ema remedy). A loss that reads only its targets' rows should
        take rows_for_loss instead; the margin loss, which searches negatives, needs this one."""
        if self.remedy == "ema":
            return F.normalize(self.ema, dim=1)  # a buffer: no gradient reaches it
        return self.unit_table()

    def rows_for_loss(self, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [U, D], local ids): the unit rows of the U distinct target ids, and target_ids renumbered
        into them (ignored ids, < 0, kept as they are). A loss that gathers only table[target_ids] gets
        the same values and gradients as from table_for_loss(), at O(U x D) instead of O(V x D) in the
        forward, the backward and (with sparse_grad) the optimizer: at V=14k on CPU the whole-table
        normalise, copy and zero-filled gradient were ~4% of the learned-target step."""
        flat = target_ids.reshape(-1)
        # unique: a repeated id is one row (its gradient summed over the repeats, as a gather's is).
        ids, inverse = torch.unique(flat, return_inverse=True)
        n_ignored = (ids < 0).sum()
        local = torch.where(flat >= 0, inverse - n_ignored, flat).reshape(target_ids.shape)
        ids = ids[ids >= 0]
        if ids.numel() == 0:
            ids = flat.new_zeros(1)  # every id ignored: one row, so that a clamped gather still has a row to read
        if self.remedy == "ema":
            return F.normalize(self.ema[ids], dim=1), local
        return self.unit_rows(ids), local

    @torch.no_grad()
    def table_for_decoding(self) -> torch.Tensor:
        return self.table_for_loss().detach().clone()

    def _candidates(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted unique ids: the batch's targets plus uniform negatives; and each target's position."""
        sampled = torch.randint(0, self.vocab_size, (self.negatives,), device=targets.device)
        candidates = torch.unique(torch.cat([targets, sampled]))
        return candidates, torch.searchsorted(candidates, targets)

    def extra_loss(self, pred: torch.Tensor, target_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """The remedy's term to add to the continuous loss (a zero tensor for none)."""
        pred = pred.reshape(-1, pred.shape[-1])
        targets = target_ids.reshape(-1)
        keep = targets != ignore_index
        pred, targets = pred[keep], targets[keep]
        if self.remedy == "none" or targets.numel() == 0:
            return pred.new_zeros(())
        if self.remedy == "ema":
            # The table moves toward the predictions; the predictions learn from the EMA copy.
            rows = self.unit_rows(targets)
            return (1 - F.cosine_similarity(pred.detach().float(), rows, dim=-1)).mean()
        candidates, labels = self._candidates(targets)
        rows = self.unit_rows(candidates)
        if self.remedy == "contrastive":
            logits = F.normalize(pred.float(), dim=-1) @ rows.T / self.temperature
            return self.contrastive_weight * F.cross_entropy(logits, labels)
        return self.vicreg_weight * vicreg_penalty(rows)

    @torch.no_grad()
    def after_step(self) -> None:
        """Call after each optimizer step (updates the EMA copy)."""
        if self.remedy == "ema":
            self.ema.mul_(self.ema_decay).add_(self.unit_table(), alpha=1 - self.ema_decay)

    def param_groups(self, base_lr: float) -> list[dict]:
        """Optimizer group for the table: its own learning-rate scale, no weight decay (rows are normalised)."""
        return [{"params": [self.weight], "lr": base_lr * self.lr_scale, "weight_decay": 0.0}]

    @torch.no_grad()
    def diagnostics(self, max_queries: int = 2048, seed: int = 0) -> dict[str, float]:
        """Collapse diagnostics of the decoding table; self-retrieval over a fixed sample of query ids."""
        table = self.table_for_decoding().float()
        rank = diag.effective_rank(table)  # on the device; the FAISS search below runs on the CPU
        table = table.cpu()
        gen = torch.Generator().manual_seed(seed)
        queries = torch.randperm(self.vocab_size, generator=gen)[:max_queries].tolist()
        duplicates = diag.duplicate_rows(table, queries)
        return {
            "targets/effective_rank": rank,
            "targets/mean_cos": diag.mean_pairwise_cosine(table),
            "targets/self_retrieval": 1.0 - len(duplicates) / max(len(queries), 1),
            "targets/duplicates": float(len(duplicates)),
        }


def vicreg_penalty(rows: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Variance hinge + covariance penalty on unit rows, scaled so an isotropic table has std 1 per dim."""
    z = rows * math.sqrt(rows.shape[1])
    z = z - z.mean(0)
    std = torch.sqrt(z.var(0) + eps)
    variance = F.relu(1 - std).mean()
    cov = (z.T @ z) / max(z.shape[0] - 1, 1)
    off_diagonal = cov - torch.diag(torch.diag(cov))
    covariance = off_diagonal.pow(2).sum() / z.shape[1]
    return variance + covariance
