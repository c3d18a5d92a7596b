"""The optimizer: AdamW for dense gradients, a lazy row-wise AdamW for row-sparse vocabulary tables.

Why: the input embedding is V x d_model (a learned target table V x D), but a batch touches only its
own ids. A dense AdamW step reads and writes all V rows (four V x d tensors) every step, which at
V = 128k cost most of a small model's step: the vocabulary cost moved from the output head into the
optimizer. With ``train.sparse_embedding`` the embedding's gradient is sparse (nn.Embedding(sparse=True)),
and so is the learned target table's (LearnedTargets(sparse_grad=True): the rows the loss and the
anti-collapse term read), and ``RowSparseAdamW`` updates only the rows in them.

Lazy semantics (as torch.optim.SparseAdam, TF LazyAdam): a row's moments and weight decay advance
only on steps whose batch contains it. A row touched on every step follows exactly torch's AdamW;
an untouched row keeps its weights and its (stale) moments, where a dense AdamW would keep moving it
by its old momentum and decay it. The bias correction uses the parameter's step count (as torch's
SparseAdam does). Gradient clipping and the NaN guard see the sparse gradient like any other.

Dense parameters take torch's ``fused`` AdamW (one kernel per group; torch's default is a Python
loop over tensors). One AdamW step over a 131072 x 128 table plus 30 128 x 128 matrices, 1 thread,
process CPU time, median of 5 [min, max] on the shared 2-core CPU: default 107 [100, 165] ms,
foreach 67 [65, 128] ms, fused 11 [10, 67] ms. The fused step's arithmetic may differ from the
loop's in the last bit.
"""
from __future__ import annotations

import torch

from pretrain.engine.guards import GuardedAdamW


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of gradients that may include sparse ones (torch's get_total_norm refuses those)."""
    dense = [g for g in grads if not g.is_sparse]
    sparse = [g.coalesce().values() for g in grads if g.is_sparse]
    parts = [torch.nn.utils.get_total_norm(dense)] if dense else []
    parts += [v.norm() for v in sparse]
    return torch.stack(parts).norm() if parts else torch.zeros(())


@torch.no_grad()
def clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for gradients that may include sparse ones (outside DeepSpeed,
    which clips inside its engine). Returns the norm before clipping."""
    norm = grad_norm(grads)
    scale = max_norm / (float(norm) + 1e-6)
    if scale < 1.0:
        for grad in grads:
            grad.mul_(scale)
    return norm


class RowSparseAdamW(GuardedAdamW):
    """GuardedAdamW (skip the step on non-finite gradients, on every rank) that also takes sparse
    gradients: those parameters get the lazy row-wise AdamW described in the module docstring."""

    @torch.no_grad()
    def step(self, closure=None):
        sparse = [(group, p) for group in self.param_groups for p in group["params"]
                  if p.grad is not None and p.grad.is_sparse]
        if not sparse:
            return super().step(closure)
        for _, p in sparse:
            p.grad = p.grad.coalesce()
        grads = [p.grad.values() if p.grad.is_sparse else p.grad
                 for group in self.param_groups for p in group["params"] if p.grad is not None]
        if self.skip_for_bad_gradients(grads):
            return None
        # The dense update, with the sparse gradients hidden from torch's AdamW (it refuses them).
        held = [(p, p.grad) for _, p in sparse]
        for p, _ in held:
            p.grad = None
        try:
            torch.optim.AdamW.step(self, closure)
        finally:
            for p, grad in held:
                p.grad = grad
        for group, p in sparse:
            self._lazy_row_update(group, p)
        return None

    def _lazy_row_update(self, group: dict, param: torch.Tensor) -> None:
        grad = param.grad
        rows, values = grad.indices()[0], grad.values()
        beta1, beta2 = group["betas"]
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        # The same arithmetic, in the same order, as torch's single-tensor AdamW, on the rows only.
        exp_avg = state["exp_avg"][rows].lerp_(values, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
        state["exp_avg"][rows] = exp_avg
        state["exp_avg_sq"][rows] = exp_avg_sq
        weights = param[rows].mul_(1 - group["lr"] * group["weight_decay"])
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        weights.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1 ** step))
        param[rows] = weights


def build_optimizer(groups: list[dict], train_cfg) -> GuardedAdamW:
    """The trainer's optimizer (DeepSpeed's client optimizer) for the model's param groups."""
    cls = RowSparseAdamW if train_cfg.sparse_embedding else GuardedAdamW
    return cls(groups, lr=train_cfg.lr, betas=train_cfg.betas, eps=1e-8, fused=True)


def skip_single_replica_allreduce(engine, zero_stage: int, data_parallel_size: int) -> bool:
    """With one data-parallel replica and no ZeRO partitioning, DeepSpeed still flattens, all-reduces
    (with itself) and copies back every gradient after each backward: turn that off. ZeRO >= 1 reduces
    inside its optimizer's hooks, which this does not touch. Returns whether it was turned off."""
    if zero_stage == 0 and data_parallel_size == 1 and getattr(engine, "pipeline_parallelism", False) is False:
        engine.enable_backward_allreduce = False
        return True
    return False
