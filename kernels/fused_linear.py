"""Fused head + loss: hidden [N, H] → linear → D → loss, in chunks of tokens.

The Liger fused-linear-cross-entropy idea applied to the continuous losses: for each chunk of tokens the
projection, the loss and its gradient are computed and the chunk's gradient is folded into
grad_hidden / grad_weight / grad_bias at once, so neither the full N×D pre-activation nor its gradient
is ever held (only chunk×D). The gradients are computed during the forward pass and scaled by the
upstream gradient in backward (reductions "mean" and "sum"; a per-token "none" would need the
upstream gradient before the chunks run).
"""
from __future__ import annotations

import torch

from pretrain_kernels import reference
from pretrain_kernels.losses import flatten_inputs, use_triton
from pretrain_kernels.params import LossParams, check_kind


def _chunk_loss_and_grads(pred, ids, table, kind, params, ignore_index, scale, triton, grad_table):
    """(sum of the chunk's loss × scale, d/dpred) for one chunk of projected rows; d/dtable is added
    into grad_table (float32 [V, D]) when it is given."""
    want_table_grad = grad_table is not None
    if triton:
        from pretrain_kernels.pointwise import loss_rows_and_grads

        loss_rows, grad_pred, _ = loss_rows_and_grads(
            pred, ids, table, kind, params, ignore_index, scale,
            want_pred_grad=True, want_table_grad=want_table_grad, table_grad_out=grad_table,
        )
        return (loss_rows.sum() * scale).squeeze(), grad_pred
    with torch.enable_grad():
        pred_leaf = pred.detach().requires_grad_(True)
        table_leaf = table.detach().requires_grad_(True) if want_table_grad else table
        loss = reference.per_token_loss(pred_leaf, ids, table_leaf, kind, params, ignore_index).sum() * scale
        inputs = [pred_leaf, table_leaf] if want_table_grad else [pred_leaf]
        grads = torch.autograd.grad(loss, inputs)
    if want_table_grad:
        grad_table += grads[1]
    return loss.detach().squeeze(), grads[0]


def fused_linear_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target_ids: torch.Tensor,
    table: torch.Tensor,
    kind: str,
    chunk_size: int = 1024,
    reduction: str = "mean",
    ignore_index: int = -100,
    impl: str = "auto",
    want_table_grad: bool = False,
    **params,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss, grad_hidden [..., H], grad_weight [D, H], grad_bias [D] or None, grad_table or None).

    weight is [D, H] like nn.Linear's; the loss is float32 (mean over non-ignored tokens, or sum).
    """
    check_kind(kind)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused head + loss supports reduction 'mean' or 'sum', got {reduction!r}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    loss_params = LossParams.from_kwargs(params)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be [D, H] with H = hidden size {hidden.shape[-1]}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [D] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    # Validates ids and the table against D without materialising the projection.
    projected_shape = torch.empty((hidden2d.shape[0], weight.shape[0]), dtype=hidden.dtype, device="meta")
    _, ids = flatten_inputs(projected_shape, target_ids.reshape(-1), table, ignore_index)
    triton = use_triton(impl, hidden.device, loss_params)
    n_valid = (ids != ignore_index).sum()
    scale = (1.0 / n_valid.clamp_min(1).float()) if reduction == "mean" else torch.ones((), device=hidden.device)

    grad_hidden = torch.empty_like(hidden2d)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if bias is not None else None
    grad_table = torch.zeros(table.shape, dtype=torch.float32, device=table.device) if want_table_grad else None
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden2d.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        hidden_chunk = hidden2d[rows]
        pred = torch.nn.functional.linear(hidden_chunk, weight, bias)
        chunk_loss, grad_pred = _chunk_loss_and_grads(
            pred, ids[rows], table, kind, loss_params, ignore_index, scale, triton, grad_table
        )
        loss += chunk_loss
        grad_pred = grad_pred.to(weight.dtype)
        grad_hidden[rows] = grad_pred @ weight
        grad_weight.addmm_(grad_pred.T.float(), hidden_chunk.float())
        if grad_bias is not None:
            grad_bias += grad_pred.float().sum(dim=0)
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return (
        loss,
        grad_hidden.reshape(hidden.shape),
        cast(grad_weight, weight),
        cast(grad_bias, bias) if bias is not None else None,
        cast(grad_table, table),
    )


class _FusedLinearContinuousLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, table, target_ids, kind, chunk_size, reduction, ignore_index, impl, params):
        loss, *grads = fused_linear_loss_and_grads(
            hidden, weight, bias, target_ids, table, kind, chunk_size, reduction, ignore_index, impl,
            want_table_grad=ctx.needs_input_grad[3], **params,
        )
        ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        ctx.has_bias = bias is not None
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, grad_bias, grad_table = ctx.saved_tensors
        scaled = [g * grad_out.to(g.dtype) if g.numel() else None for g in (grad_hidden, grad_weight, grad_bias, grad_table)]
        if not ctx.has_bias:
            scaled[2] = None
        return (*scaled, None, None, None, None, None, None, None)


def fused_linear_continuous_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target_ids: torch.Tensor,
    table: torch.Tensor,
    kind: str,
    chunk_size: int = 1024,
    reduction: str = "mean",
    ignore_index: int = -100,
    impl: str = "auto",
    **params,
) -> torch.Tensor:
    """Loss of the head `linear(hidden, weight, bias)` without storing its N×D output; differentiable.

    hidden [..., H], weight [D, H], bias [D] or None, target_ids [...], table [V, D]. Gradients
    (computed chunk by chunk in the forward pass) reach hidden, weight, bias and a learned table.
    """
    return _FusedLinearContinuousLoss.apply(
        hidden, weight, bias, table, target_ids, kind, chunk_size, reduction, ignore_index, impl, params
    )
