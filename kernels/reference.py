"""Plain-PyTorch reference losses: readable, differentiable by autograd, the CPU path and the oracle.

Notation: p = prediction row (ê), κ = ‖p‖, μ = p/κ, e = E[y] (the target row), ê_t = e/‖e‖,
c = cos(p, e) = μ·ê_t. Norms are clamped at EPS like F.normalize. Per token:

    cosine            1 − c
    l2                ‖μ − ê_t‖²                        (= 2 − 2c: squared L2 between unit vectors)
    l2_raw            ‖p − e‖²                          (no normalisation: pulls ‖p‖ to ‖e‖ as well)
    vmf               −log C_m(κ) − pᵀe                 (Kumar & Tsvetkov 2019, NLLvMF)
    vmf_reg1          −log C_m(κ) − pᵀe + λ1·κ
    vmf_reg2          −log C_m(κ) − λ2·pᵀe
    vmf_practice      −log C_m(κ) + log(1+κ)·(λ − c)    (the form their public code trains with)
    margin            max(0, γ + cos(p, E_j*) − c),  j* = argmax_{j≠y} cos(p, E_j) − cos(e, E_j)
    syn_margin_orth   max(0, γ + μ·u − c),  u = normalise(μ − c·ê_t)   (Bhat et al. 2019)
    syn_margin_diff   max(0, γ + μ·u − c),  u = normalise(μ − ê_t)
                      (c clamped to [−1, 1]; μ·u computed stably: synthetic_negative_cos)

The synthetic negatives u are part of the graph (not detached). The margin's negative j* is a
selection (no gradient flows through the argmax); it is searched over the whole table in token chunks
(`most_violating_negatives`), never as one N×V matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain_kernels.params import EPS, SYN_SLOPE_FLOOR, LossParams
from pretrain_kernels.vmf_normaliser import log_cm

# Token chunk of the reference negative search: chunk × V scores (16 MiB) at a time.
_SEARCH_SCORES_PER_CHUNK = 1 << 22


@torch.no_grad()
def most_violating_negatives(pred: torch.Tensor, target_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """j* = argmax_{j≠y} cos(p, E_j) − cos(e, E_j) per row (rows with an ignored id: any value).

    cos(p, E_j) − cos(e, E_j) = (μ − ê_t)·E_j / ‖E_j‖: one matrix product per chunk of tokens.
    """
    if table.shape[0] < 2:
        raise ValueError("the margin loss needs a target table with at least 2 rows (a negative besides the target)")
    vocab = table.shape[0]
    safe_ids = target_ids.clamp(0, vocab - 1)
    table32 = table.float()
    inv_norm = 1.0 / table32.norm(dim=-1).clamp_min(EPS)
    chunk = max(1, _SEARCH_SCORES_PER_CHUNK // vocab)
    out = torch.empty_like(safe_ids)
    for start in range(0, pred.shape[0], chunk):
        rows = slice(start, start + chunk)
        query = F.normalize(pred[rows].float(), dim=-1, eps=EPS) - F.normalize(table32[safe_ids[rows]], dim=-1, eps=EPS)
        # [V, chunk] (table @ queryᵀ): the other orientation makes CPU BLAS copy the whole table.
        scores = (table32 @ query.T).mul_(inv_norm[:, None])
        scores.scatter_(0, safe_ids[None, rows], float("-inf"))
        out[rows] = scores.argmax(dim=0)
    return out


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=-1)


def per_token_loss_valid(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    params: LossParams,
    negative: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss of each row given the gathered target rows (all rows valid). Computes in pred's dtype."""
    m = pred.shape[-1]
    mu = F.normalize(pred, dim=-1, eps=EPS)
    unit_target = F.normalize(target, dim=-1, eps=EPS)
    cos = _row_dot(mu, unit_target)
    if kind == "cosine":
        return 1.0 - cos
    if kind == "l2":
        return (mu - unit_target).pow(2).sum(dim=-1)
    if kind == "l2_raw":
        return (pred - target).pow(2).sum(dim=-1)
    if kind.startswith("vmf"):
        kappa = pred.norm(dim=-1)
        # The exact normaliser runs in float64 on the host; closed forms in the compute dtype.
        neg_log_cm = -log_cm(kappa, m, exact=params.vmf_exact, approx=params.vmf_approx)
        dot = _row_dot(pred, target)
        if kind == "vmf":
            return neg_log_cm - dot
        if kind == "vmf_reg1":
            return neg_log_cm - dot + params.vmf_lambda1 * kappa
        if kind == "vmf_reg2":
            return neg_log_cm - params.vmf_lambda2 * dot
        return neg_log_cm + torch.log1p(kappa) * (params.vmf_lambda - cos)
    if kind == "margin":
        negative_cos = _row_dot(mu, F.normalize(negative, dim=-1, eps=EPS))
        return torch.relu(params.margin + negative_cos - cos)
    if kind in ("syn_margin_orth", "syn_margin_diff"):
        cos = cos.clamp(-1.0, 1.0)
        return torch.relu(params.margin + synthetic_negative_cos(kind, pred, target, mu, unit_target, cos) - cos)
    raise ValueError(f"unknown continuous loss {kind!r}")


def synthetic_negative_cos(
    kind: str, pred: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, unit_target: torch.Tensor, cos: torch.Tensor
) -> torch.Tensor:
    """μ·u of the syn-margins, from a residual vector r (accurate where μ ≈ ±ê_t):

        u_orth = r/‖r‖, r = μ − c·ê_t:   μ·u = ‖r‖            (= √(1 − c²))
        u_diff = r/‖r‖, r = μ − ê_t:     μ·u = (‖r‖² + ‖μ‖² − ‖ê_t‖²) / (2‖r‖)   (= √((1 − c)/2))

    Normalising r itself (the textbook form) divides rounding noise by its own size at c = ±1: the
    loss at p = −3·E[y] came out anywhere in [0.5, 2.4] in float32 instead of γ + 1.
    Zero rows (‖p‖ or ‖e‖ = 0): μ or ê_t is 0 as F.normalize leaves it, so c = 0 and μ·u = ‖μ‖ for
    u_orth, (‖μ‖² − ‖ê_t‖² + ‖r‖²)/(2‖r‖) for u_diff: a zero prediction's loss is γ (no direction, so
    no similarity to either side). Where u's direction is unresolved (‖r‖ ≤ SYN_SLOPE_FLOOR) or a
    row is zero, μ·u has no slope (a subgradient at the cone's tip).
    """
    # ‖μ‖ and ‖ê_t‖: exactly 1 (so that they cancel exactly), or below 1 for a norm under EPS.
    mu_norm = (pred.norm(dim=-1) / EPS).clamp(max=1.0)
    target_norm = (target.norm(dim=-1) / EPS).clamp(max=1.0)
    if kind == "syn_margin_orth":
        width = _safe_norm(mu - cos[:, None] * unit_target)
        negative_cos = width
    else:
        width = _safe_norm(mu - unit_target)
        norms_differ = mu_norm != target_norm
        negative_cos = 0.5 * width + torch.where(
            norms_differ, (mu_norm**2 - target_norm**2) / (2.0 * width.clamp_min(1e-30)), torch.zeros_like(width)
        )
    slope_ok = (width > SYN_SLOPE_FLOOR) & (mu_norm == 1.0) & (target_norm == 1.0)
    return torch.where(slope_ok, negative_cos, negative_cos.detach())


def _safe_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖ per row, with a zero (not NaN) gradient at x = 0."""
    squared = (x * x).sum(dim=-1)
    positive = squared > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, squared, torch.ones_like(squared))), torch.zeros_like(squared))


def per_token_loss(
    pred: torch.Tensor,
    target_ids: torch.Tensor,
    table: torch.Tensor,
    kind: str,
    params: LossParams,
    ignore_index: int = -100,
    negative_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N] loss per row of pred [N, D] (0 at ignored rows; float32, or float64 for float64 inputs);
    gradients reach pred and table, in their dtypes.

    Computes in float32 (float64 inputs: float64) like the kernels: for bf16 inputs this is also the
    "plain PyTorch at the same storage dtype" baseline of the tolerance rule (tolerances.py).
    negative_ids [N]: the margin's negatives, if already chosen (else searched here).
    """
    valid = target_ids != ignore_index
    rows = valid.nonzero().squeeze(1)
    ids = target_ids[rows]
    compute_dtype = torch.promote_types(pred.dtype, torch.float32)
    cast = lambda t: t.to(compute_dtype)  # noqa: E731
    pred_rows = cast(pred[rows])
    negative = None
    if kind == "margin":
        if negative_ids is None:
            negative = table[most_violating_negatives(pred_rows, ids, table)]  # no_grad inside
        else:
            negative = table[negative_ids[rows]]
        negative = cast(negative)
    loss_rows = per_token_loss_valid(pred_rows, cast(table[ids]), kind, params, negative)
    out_dtype = torch.promote_types(loss_rows.dtype, torch.float32)  # float32, or float64 for float64 inputs
    out = torch.zeros(target_ids.shape, dtype=out_dtype, device=pred.device)
    return out.index_put((rows,), loss_rows.to(out_dtype))
