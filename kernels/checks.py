"""Kernel-vs-truth checks on any device: the tests run them under Triton's CPU interpreter, and
`make gpu-check` (scripts/gpu_check.py) runs the same checks on CUDA, where bf16 `tl.dot` and real
bf16 rounding exist.

compare_with_truth applies the rule of tolerances.py to the loss, dL/dpred and dL/dtable: the kernel
against a float64 truth from the same inputs, no worse than plain PyTorch at the same storage dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain_kernels import tolerances
from pretrain_kernels.losses import continuous_loss, reduce_rows
from pretrain_kernels.params import LossParams

IGNORE = -100


def make_case(n: int, d: int, v: int, dtype: torch.dtype, seed: int = 0, device: str | torch.device = "cpu"):
    """(pred [n, d], ids [n] with every 7th ignored, unit table [v, d]); pred norms from ~0.03 to ~3
    per coordinate, so vMF sees κ from ~0.3 to ~30."""
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(n, d, generator=gen) * torch.logspace(-1.5, 0.5, n)[:, None]
    table = F.normalize(torch.randn(v, d, generator=gen), dim=-1)
    ids = torch.randint(0, v, (n,), generator=gen)
    ids[::7] = IGNORE
    return pred.to(device, dtype), ids.to(device), table.to(device, dtype)


def loss_and_grads(fn, pred, table, reduction, weights):
    """(loss, dL/dpred, dL/dtable) of fn(pred, table); reduction "none" is weighted per row."""
    pred = pred.detach().clone().requires_grad_(True)
    table = table.detach().clone().requires_grad_(True)
    loss = fn(pred, table)
    (loss * weights if reduction == "none" else loss).sum().backward()
    return loss.detach(), pred.grad, table.grad


def reference_fn(kind, ids, reduction, params, negative_ids=None):
    from pretrain_kernels import reference

    def fn(pred, table):
        rows = reference.per_token_loss(pred, ids, table, kind, params, IGNORE, negative_ids=negative_ids)
        return reduce_rows(rows, ids != IGNORE, reduction, ids.shape)

    return fn


def kernel_fn(kind, ids, reduction, params):
    return lambda p, t: continuous_loss(p, ids, t, kind, reduction, IGNORE, impl="triton", **params.as_dict())


def compare_with_truth(kind, pred, ids, table, reduction, params=LossParams(), kernel=None):
    """[(output name, ok, message)] of the tolerance rule for the loss, dL/dpred and dL/dtable, plus
    ("dtypes", ...) and ("ignored rows", ...) checks of the kernel's outputs."""
    from pretrain_kernels import max_margin

    dtype = pred.dtype
    weights = torch.linspace(0.5, 1.5, ids.numel(), device=pred.device)
    negative_ids = None
    if kind == "margin" and dtype != torch.float32:
        # In bf16 a near-tie may pick another (equally violating) negative: compare the loss given the
        # kernel's choice; the search itself is checked by search_is_near_best.
        negative_ids = max_margin.most_violating_negatives(pred, ids, table, IGNORE)
    got = loss_and_grads(kernel or kernel_fn(kind, ids, reduction, params), pred, table, reduction, weights)
    truth = loss_and_grads(
        reference_fn(kind, ids, reduction, params, negative_ids), pred.double(), table.double(), reduction, weights.double()
    )
    # Plain PyTorch at the same storage dtype: float32 arithmetic, gradients in the inputs' dtype.
    same_dtype = loss_and_grads(reference_fn(kind, ids, reduction, params, negative_ids), pred, table, reduction, weights)
    out = [(name, *tolerances.kernel_matches(*outputs)) for name, outputs in zip(("loss", "dpred", "dtable"), zip(got, truth, same_dtype))]
    dtypes_ok = got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    out.append(("dtypes", dtypes_ok, f"loss {got[0].dtype}, dpred {got[1].dtype}, dtable {got[2].dtype} (inputs {dtype})"))
    out.append(("ignored rows", bool(torch.all(got[1][ids == IGNORE] == 0)), "dL/dpred must be 0 at ignored rows"))
    return out


def brute_force_search_scores(pred, ids, table):
    """[N, V] float64 scores (μ − ê_t)·E_j/‖E_j‖ of the margin's negative search, −inf at the target."""
    table64 = table.double()
    scores = (F.normalize(pred.double(), dim=-1) - F.normalize(table64[ids.clamp_min(0)], dim=-1)) @ table64.T
    scores /= table64.norm(dim=-1)
    scores[torch.arange(len(ids), device=ids.device), ids.clamp_min(0)] = float("-inf")
    return scores


def search_is_near_best(pred, ids, table, slack: float) -> tuple[bool, str]:
    """The tiled search's choice is never the target and scores within `slack` of the best."""
    from pretrain_kernels import max_margin

    got = max_margin.most_violating_negatives(pred, ids, table, IGNORE)
    scores = brute_force_search_scores(pred, ids, table)
    valid = ids != IGNORE
    chosen = scores[torch.arange(len(ids), device=ids.device), got][valid]
    shortfall = (scores.max(dim=-1).values[valid] - chosen).max().item()
    ok = bool(torch.all(got[valid] != ids[valid])) and shortfall <= slack
    return ok, f"worst shortfall from the best negative {shortfall:.3e} (allowed {slack:.1e})"


def strided_layouts(pred, ids, table):
    """The same values in non-contiguous layouts: (name, pred, ids, table) for a column slice of a wider
    tensor (row stride > D), a transpose (column stride ≠ 1) with ids read with a step, and every other
    row of a taller table. The padding is NaN, so reading it shows."""
    n, d = pred.shape
    wide_pred = torch.full((n, d + 13), float("nan"), dtype=pred.dtype, device=pred.device)
    wide_pred[:, 5 : 5 + d] = pred
    wide_table = torch.full((table.shape[0], d + 7), float("nan"), dtype=table.dtype, device=table.device)
    wide_table[:, 2 : 2 + d] = table
    tall_table = torch.full((2 * table.shape[0], d), float("nan"), dtype=table.dtype, device=table.device)
    tall_table[::2] = table
    stepped_ids = torch.full((3 * n,), 12345, dtype=ids.dtype, device=ids.device)
    stepped_ids[::3] = ids
    yield "column slice", wide_pred[:, 5 : 5 + d], ids, wide_table[:, 2 : 2 + d]
    yield "transpose", pred.T.contiguous().T, stepped_ids[::3], table.T.contiguous().T
    yield "row step", pred, ids, tall_table[::2]


def strided_layouts_match(kind, pred, ids, table) -> list[tuple[str, bool, str]]:
    """[(layout, ok, message)]: the kernel's loss rows and both gradients on each strided layout equal
    those on the contiguous tensors, up to the order of the table gradient's atomic adds on a GPU
    (1e-5 relative in float32; one ulp, 2^-7 relative, once rounded to bf16)."""
    weights = torch.linspace(0.5, 1.5, ids.numel(), device=pred.device)
    run = lambda p, i, t: loss_and_grads(kernel_fn(kind, i, "none", LossParams()), p, t, "none", weights)  # noqa: E731
    want = run(pred, ids, table)
    out = []
    for layout, p, i, t in strided_layouts(pred, ids, table):
        if p.is_contiguous() and i.is_contiguous() and t.is_contiguous():
            out.append((layout, False, "layout is contiguous: it tests nothing"))
            continue
        ratios = []
        for got, expected in zip(run(p, i, t), want):
            rel = 2.0**-7 if got.dtype == torch.bfloat16 else 1e-5
            allowed = 1e-6 + rel * expected.double().abs().max().item()
            ratios.append((got.double() - expected.double()).abs().max().item() / allowed)
        out.append((layout, max(ratios) <= 1.0, f"worst error / allowed over loss, dpred, dtable: {max(ratios):.2e}"))
    return out
