"""Triton kernel for the per-token losses (all but the margin's negative search), forward and backward.

Every loss here is a function of a few row scalars: κ = ‖p‖, ‖e‖, pᵀe (and ‖n‖, pᵀn for the margin's
negative row n). One program loads BLOCK_N whole rows of p and gathers e = E[y] (and n) inside the
kernel, computes those scalars in float32, the loss and its partials, and — when asked — the
gradients as linear combinations of the rows:

    dL/dp = G_κ·p/κ + G_dot·e + G_pn·n,    dL/de = G_e·e/‖e‖ + G_dot·p,    dL/dn = G_n·n/‖n‖ + G_pn·p

Gradients to the table (learned targets) are accumulated with atomic adds into a float32 [V, D]
buffer (order-dependent in the last bits). The vMF normaliser is the closed form (vmf_normaliser.py),
so nothing leaves the device.

Autograd: for reductions mean/sum the gradient is computed in the forward pass (one read of the rows,
Liger-style) and scaled by the upstream scalar in backward; for "none", or when the forward ran
without grad, backward recomputes with the per-row upstream gradient.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pretrain_kernels.params import EPS, LOSS_NAMES, SYN_SLOPE_FLOOR, LossParams
from pretrain_kernels.vmf_normaliser import APPROXIMATIONS, check_approx

# params' constants as Triton compile-time values (a @triton.jit function reads only constexpr globals).
EPS_C = tl.constexpr(EPS)
INV_EPS_C = tl.constexpr(1.0 / EPS)
SYN_SLOPE_FLOOR_C = tl.constexpr(SYN_SLOPE_FLOOR)

KIND_IDS = {name: i for i, name in enumerate(LOSS_NAMES)}
COSINE, L2, L2_RAW, VMF, VMF_REG1, VMF_REG2, VMF_PRACTICE, MARGIN, SYN_ORTH, SYN_DIFF = range(len(LOSS_NAMES))
APPROX_IDS = {name: i for i, name in enumerate(APPROXIMATIONS)}
LOG_2PI = 1.8378770664093453
MAX_BLOCK_D = 16384


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _log1p(x):
    # No libdevice in the interpreter; log(u)·x/(u−1) with u = 1+x is accurate for small x.
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * x / tl.where(exact, 1.0, u - 1.0))


@triton.jit
def _row_norm(x):
    """‖x‖ per row of a [BLOCK_N, BLOCK_D] tile; rescaled by max|x| where Σx² overflows float32."""
    plain = tl.sqrt(tl.sum(x * x, axis=1))
    biggest = tl.max(tl.abs(x), axis=1)
    scaled = x / tl.where(biggest > 0.0, biggest, 1.0)[:, None]
    return tl.where(plain < 1e30, plain, biggest * tl.sqrt(tl.sum(scaled * scaled, axis=1)))


@triton.jit
def _hypot(a, b):
    """√(a² + b²) without overflowing for κ ≳ 1e19 (κ² > float32 max)."""
    big = tl.maximum(a, b)
    ratio = tl.minimum(a, b) / tl.where(big > 0.0, big, 1.0)
    return big * tl.sqrt(1.0 + ratio * ratio)


@triton.jit
def _neg_log_cm(kappa, v, APPROX: tl.constexpr):
    """(−log C_m(κ), d/dκ of it) in closed form; m = 2v + 2. Same formulas as vmf_normaliser.py."""
    if APPROX == 0:
        s = _hypot(tl.zeros_like(kappa) + v, kappa)
        t = v / s
        t2 = t * t
        poly = 1.0 + (3.0 - 5.0 * t2) / (24.0 * s) + (81.0 - 462.0 * t2 + 385.0 * t2 * t2) / (1152.0 * s * s)
        dpoly = (3.0 - 15.0 * t2) / 24.0 + (162.0 - 1848.0 * t2 + 2310.0 * t2 * t2) / (1152.0 * s)
        log_cm = -s + v * tl.log(v + s) + 0.5 * tl.log(s) - (v + 0.5) * 1.8378770664093453 - tl.log(poly)
        dlog_cm = -kappa / (v + s) + kappa / (2.0 * s * s) + kappa * dpoly / (s * s * s * poly)
        return -log_cm, -dlog_cm
    else:
        if APPROX == 1:
            a = v + 1.0
        else:
            a = v - 1.0
        root = _hypot(tl.zeros_like(kappa) + a, kappa)
        return root - (v - 1.0) * tl.log(v - 1.0 + root), kappa / (v - 1.0 + root)


@triton.jit
def _pointwise_loss_kernel(
    pred_ptr, ids_ptr, table_ptr, neg_ids_ptr, scale_ptr,
    loss_ptr, dpred_ptr, dtable_ptr,
    N, D, stride_pred, stride_table, stride_dpred,
    ignore_index, v, lambda1, lambda2, lam, margin,
    KIND: tl.constexpr, APPROX: tl.constexpr, SCALE_PER_ROW: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, TABLE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (ids != ignore_index)
    safe_ids = tl.where(valid, ids, 0).to(tl.int64)
    tile_mask = valid[:, None] & (cols[None, :] < D)
    pred_offsets = rows.to(tl.int64)[:, None] * stride_pred + cols[None, :]
    target_offsets = safe_ids[:, None] * stride_table + cols[None, :]
    # Upcast right after loading: float32 accumulation for every dtype.
    p = tl.load(pred_ptr + pred_offsets, mask=tile_mask, other=0.0).to(tl.float32)
    e = tl.load(table_ptr + target_offsets, mask=tile_mask, other=0.0).to(tl.float32)

    kappa = _row_norm(p)
    norm_e = _row_norm(e)
    dot = tl.sum(p * e, axis=1)
    inv_k = 1.0 / tl.maximum(kappa, EPS_C)
    inv_e = 1.0 / tl.maximum(norm_e, EPS_C)
    cos = dot * inv_k * inv_e

    # Partials of the loss: w.r.t. κ (direct), cos, pᵀe (direct), ‖e‖ (direct), and the negative's cos.
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    l_kappa = zero
    l_cos = zero
    l_dot = zero
    l_norm_e = zero
    l_cos_neg = zero
    if KIND == 0:  # cosine
        loss = 1.0 - cos
        l_cos = zero - 1.0
    elif KIND == 1:  # l2 between unit vectors: ‖μ‖² + ‖ê_t‖² − 2c
        mu2 = kappa * inv_k
        et2 = norm_e * inv_e
        loss = mu2 * mu2 + et2 * et2 - 2.0 * cos
        l_cos = zero - 2.0
    elif KIND == 2:  # l2_raw
        diff = p - e
        loss = tl.sum(diff * diff, axis=1)
        l_kappa = 2.0 * kappa
        l_norm_e = 2.0 * norm_e
        l_dot = zero - 2.0
    elif KIND <= 6:  # the vMF family
        neg_log_cm, dneg_log_cm = _neg_log_cm(kappa, v, APPROX)
        l_kappa = dneg_log_cm
        if KIND == 3:
            loss = neg_log_cm - dot
            l_dot = zero - 1.0
        elif KIND == 4:
            loss = neg_log_cm - dot + lambda1 * kappa
            l_dot = zero - 1.0
            l_kappa = dneg_log_cm + lambda1
        elif KIND == 5:
            loss = neg_log_cm - lambda2 * dot
            l_dot = zero - lambda2
        else:
            log1p_k = _log1p(kappa)
            loss = neg_log_cm + log1p_k * (lam - cos)
            l_kappa = dneg_log_cm + (lam - cos) / (1.0 + kappa)
            l_cos = -log1p_k
    elif KIND == 7:  # margin against a gathered negative row
        neg_ids = tl.load(neg_ids_ptr + rows, mask=valid, other=0).to(tl.int64)
        n = tl.load(table_ptr + neg_ids[:, None] * stride_table + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        norm_n = _row_norm(n)
        inv_n = 1.0 / tl.maximum(norm_n, EPS_C)
        cos_neg = tl.sum(p * n, axis=1) * inv_k * inv_n
        hinge = margin + cos_neg - cos
        active = (hinge > 0.0).to(tl.float32)
        loss = tl.maximum(hinge, 0.0)
        l_cos = -active
        l_cos_neg = active
    else:  # syn-margins: the negative u is synthesised from μ and ê_t (reference.py has the formulas)
        # ‖μ‖, ‖ê_t‖ as F.normalize leaves them: exactly 1, or below 1 for a norm under EPS.
        mu_norm = tl.where(kappa >= EPS_C, 1.0, kappa * INV_EPS_C)
        target_norm = tl.where(norm_e >= EPS_C, 1.0, norm_e * INV_EPS_C)
        c = tl.minimum(tl.maximum(cos, -1.0), 1.0)
        mu = p * inv_k[:, None]
        unit_e = e * inv_e[:, None]
        # μ·u from a residual vector, not from 1 − c² (c's rounding would become ~3e-4 at c = ±1).
        if KIND == 8:  # u_orth: μ·u = ‖μ − c·ê_t‖
            resid = mu - c[:, None] * unit_e
            width = tl.sqrt(tl.sum(resid * resid, axis=1))
            neg_cos = width
            slope = -c / tl.maximum(width, 1e-30)
        else:  # u_diff: μ·u = (‖μ − ê_t‖² + ‖μ‖² − ‖ê_t‖²) / (2‖μ − ê_t‖)
            resid = mu - unit_e
            width = tl.sqrt(tl.sum(resid * resid, axis=1))
            norms_differ = mu_norm != target_norm
            neg_cos = 0.5 * width + tl.where(
                norms_differ, (mu_norm * mu_norm - target_norm * target_norm) / (2.0 * tl.maximum(width, 1e-30)), 0.0
            )
            slope = -0.5 / tl.maximum(width, 1e-30)
        # No slope through u where its direction is unresolved (params.SYN_SLOPE_FLOOR) or a row is zero.
        slope_ok = (width > SYN_SLOPE_FLOOR_C) & (mu_norm == 1.0) & (target_norm == 1.0)
        hinge = margin + neg_cos - c
        active = (hinge > 0.0).to(tl.float32)
        loss = tl.maximum(hinge, 0.0)
        c_inside = (cos >= -1.0) & (cos <= 1.0)  # clamp(c): no slope outside [−1, 1]
        l_cos = tl.where(c_inside, active * (tl.where(slope_ok, slope, 0.0) - 1.0), 0.0)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_ok)

    if COMPUTE_GRAD:
        if SCALE_PER_ROW:
            scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        else:
            scale = tl.load(scale_ptr).to(tl.float32) + zero
        scale = tl.where(valid, scale, 0.0)
        # Chain rule through cos = pᵀe/(‖p‖‖e‖) (the clamped norms have zero slope below EPS).
        dcos_dkappa = tl.where(kappa > EPS_C, -cos * inv_k, 0.0)
        dcos_dnorm_e = tl.where(norm_e > EPS_C, -cos * inv_e, 0.0)
        g_kappa = l_kappa + l_cos * dcos_dkappa
        g_dot = l_dot + l_cos * inv_k * inv_e
        g_norm_e = l_norm_e + l_cos * dcos_dnorm_e
        # dκ/dp = p/κ (0 at p = 0).
        inv_kappa_exact = tl.where(kappa > 0.0, 1.0 / tl.where(kappa > 0.0, kappa, 1.0), 0.0)
        inv_norm_e_exact = tl.where(norm_e > 0.0, 1.0 / tl.where(norm_e > 0.0, norm_e, 1.0), 0.0)
        dp = (g_kappa * inv_kappa_exact)[:, None] * p + g_dot[:, None] * e
        de = (g_norm_e * inv_norm_e_exact)[:, None] * e + g_dot[:, None] * p
        if KIND == 7:
            g_kappa_neg = l_cos_neg * tl.where(kappa > EPS_C, -cos_neg * inv_k, 0.0)
            g_pn = l_cos_neg * inv_k * inv_n
            g_norm_n = l_cos_neg * tl.where(norm_n > EPS_C, -cos_neg * inv_n, 0.0)
            inv_norm_n_exact = tl.where(norm_n > 0.0, 1.0 / tl.where(norm_n > 0.0, norm_n, 1.0), 0.0)
            dp += (g_kappa_neg * inv_kappa_exact)[:, None] * p + g_pn[:, None] * n
        # Ignored rows get an explicit 0 (the buffer is uninitialised).
        row_mask = row_ok[:, None] & (cols[None, :] < D)
        dpred_offsets = rows.to(tl.int64)[:, None] * stride_dpred + cols[None, :]
        tl.store(dpred_ptr + dpred_offsets, tl.where(valid[:, None], dp * scale[:, None], 0.0), mask=row_mask)
        if TABLE_GRAD:
            tl.atomic_add(dtable_ptr + safe_ids[:, None] * D + cols[None, :], de * scale[:, None], mask=tile_mask)
            if KIND == 7:
                dn = (g_norm_n * inv_norm_n_exact)[:, None] * n + g_pn[:, None] * p
                tl.atomic_add(dtable_ptr + neg_ids[:, None] * D + cols[None, :], dn * scale[:, None], mask=tile_mask)


def block_sizes(dim: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps): whole rows per program, ~8k elements per tile."""
    block_d = triton.next_power_of_2(dim)
    if block_d > MAX_BLOCK_D:
        raise ValueError(f"the Triton continuous losses support D ≤ {MAX_BLOCK_D}, got D={dim}; use impl='reference'")
    block_n = max(1, min(64, 8192 // block_d))
    return block_n, block_d, (4 if block_n * block_d <= 4096 else 8)


def loss_rows_and_grads(
    pred: torch.Tensor,
    ids: torch.Tensor,
    table: torch.Tensor,
    kind: str,
    params: LossParams,
    ignore_index: int,
    scale: torch.Tensor | None = None,
    want_pred_grad: bool = False,
    want_table_grad: bool = False,
    negative_ids: torch.Tensor | None = None,
    table_grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One launch: loss per row [N] (float32, 0 at ignored rows) and optionally dL/dpred (pred's dtype)
    and dL/dtable (float32), each row's gradient multiplied by `scale` (a 0-dim or [N] tensor).
    table_grad_out: a float32 [V, D] buffer that dL/dtable is added into (and returned), so that
    chunked callers keep one accumulator instead of allocating and zeroing V×D per chunk."""
    n_rows, dim = pred.shape
    if kind.startswith("vmf"):
        check_approx(params.vmf_approx, dim)
    # Rows may be strided (a column slice of a wider tensor): the kernels take a row stride, but
    # need unit column stride; ids and negatives are read densely.
    pred = pred.contiguous() if pred.stride(-1) != 1 else pred
    table = table.contiguous() if table.stride(-1) != 1 else table
    ids = ids.contiguous()
    if kind == "margin" and negative_ids is None:
        from pretrain_kernels.max_margin import most_violating_negatives

        negative_ids = most_violating_negatives(pred, ids, table, ignore_index)
    compute_grad = want_pred_grad or want_table_grad
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=pred.device)
    # Dense [N, D] whatever pred's strides (empty_like would copy a view's layout only sometimes).
    dpred = torch.empty((n_rows, dim), dtype=pred.dtype, device=pred.device) if compute_grad else loss_rows
    if want_table_grad and table_grad_out is not None:
        if table_grad_out.shape != table.shape or table_grad_out.dtype != torch.float32 or not table_grad_out.is_contiguous():
            raise ValueError(f"table_grad_out must be a contiguous float32 {tuple(table.shape)} tensor")
        dtable = table_grad_out
    elif want_table_grad:
        dtable = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
    else:
        dtable = loss_rows
    if scale is None:
        scale = torch.ones((), dtype=torch.float32, device=pred.device)
    block_n, block_d, num_warps = block_sizes(dim)
    _pointwise_loss_kernel[(triton.cdiv(n_rows, block_n),)](
        pred, ids, table, negative_ids.contiguous() if negative_ids is not None else ids, scale.contiguous(),
        loss_rows, dpred, dtable,
        n_rows, dim, pred.stride(0), table.stride(0), dim,
        ignore_index, dim / 2.0 - 1.0, params.vmf_lambda1, params.vmf_lambda2, params.vmf_lambda, params.margin,
        KIND=KIND_IDS[kind], APPROX=APPROX_IDS[params.vmf_approx], SCALE_PER_ROW=scale.dim() > 0,
        COMPUTE_GRAD=compute_grad, TABLE_GRAD=want_table_grad,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    return loss_rows, (dpred if want_pred_grad else None), (dtable if want_table_grad else None)


class _PointwiseLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, table, ids, kind, params, reduction, ignore_index):
        n_valid = (ids != ignore_index).sum()
        want_pred, want_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # mean/sum: the upstream gradient is one scalar, so compute the gradient now (single pass).
        grads_now = reduction != "none" and (want_pred or want_table)
        scale = (1.0 / n_valid.clamp_min(1).float()) if reduction == "mean" else torch.ones((), device=pred.device)
        negative_ids = None
        if kind == "margin":
            from pretrain_kernels.max_margin import most_violating_negatives

            negative_ids = most_violating_negatives(pred, ids, table, ignore_index)
        loss_rows, dpred, dtable = loss_rows_and_grads(
            pred, ids, table, kind, params, ignore_index, scale,
            want_pred_grad=grads_now and want_pred, want_table_grad=grads_now and want_table, negative_ids=negative_ids,
        )
        ctx.grads_now = grads_now
        ctx.table_dtype = table.dtype
        ctx.setup = (kind, params, reduction, ignore_index)
        if grads_now:
            ctx.save_for_backward(dpred, dtable)
        else:
            ctx.save_for_backward(pred, table, ids, negative_ids, n_valid)
        if reduction == "none":
            return loss_rows
        return loss_rows.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        kind, params, reduction, ignore_index = ctx.setup
        want_pred, want_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.grads_now:
            dpred, dtable = ctx.saved_tensors
            dpred = dpred * grad_out.to(dpred.dtype) if want_pred else None
            dtable = dtable * grad_out if want_table else None
        else:
            pred, table, ids, negative_ids, n_valid = ctx.saved_tensors
            if reduction == "none":
                scale = grad_out.float().contiguous()
            elif reduction == "mean":
                scale = grad_out.float() / n_valid.clamp_min(1).float()
            else:
                scale = grad_out.float()
            _, dpred, dtable = loss_rows_and_grads(
                pred, ids, table, kind, params, ignore_index, scale,
                want_pred_grad=want_pred, want_table_grad=want_table, negative_ids=negative_ids,
            )
        if dtable is not None:
            dtable = dtable.to(ctx.table_dtype)
        return dpred, dtable, None, None, None, None, None


def triton_continuous_loss(pred, ids, table, kind, params, reduction, ignore_index, shape):
    """Triton path of `continuous_loss` (pred [N, D], ids [N] already checked)."""
    loss = _PointwiseLoss.apply(pred, table, ids, kind, params, reduction, ignore_index)
    return loss.reshape(shape) if reduction == "none" else loss
