"""`continuous_loss`: the one entry point; picks the Triton kernels on CUDA, the reference elsewhere."""
from __future__ import annotations

import os

import torch

from pretrain_kernels import reference
from pretrain_kernels.params import LossParams, check_kind, check_reduction

IMPLS = ("auto", "triton", "reference")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(impl: str, device: torch.device, params: LossParams) -> bool:
    """auto -> Triton on CUDA (unless the exact vMF normaliser needs the host); triton -> insist."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: choose one of {', '.join(IMPLS)}")
    if impl == "reference":
        return False
    if impl == "auto":
        return device.type == "cuda" and triton_available() and not params.vmf_exact
    if not triton_available():
        raise ValueError("impl='triton' but the triton package is not installed (pip install triton; Linux only)")
    if params.vmf_exact:
        raise ValueError(
            "impl='triton' cannot use the exact vMF normaliser (it needs SciPy on the host); "
            "set loss.vmf_exact=false (closed form) or loss.impl=reference"
        )
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 in the environment before the "
            "kernels are imported (Triton's CPU interpreter; slow, for tests)"
        )
    return True


def flatten_inputs(
    pred: torch.Tensor, target_ids: torch.Tensor, table: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes, dtypes and ids; return pred [N, D] and ids [N] (int64)."""
    if not (torch.is_tensor(pred) and torch.is_tensor(target_ids) and torch.is_tensor(table)):
        raise ValueError("continuous_loss: pred, target_ids and table must be tensors")
    if table.dim() != 2:
        raise ValueError(f"target table must be [V, D], got shape {tuple(table.shape)}")
    if pred.shape[-1] != table.shape[1]:
        raise ValueError(
            f"prediction dim {pred.shape[-1]} != target table dim {table.shape[1]} "
            "(model head output size must equal targets.dim)"
        )
    if pred.shape[:-1] != target_ids.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target_ids {tuple(target_ids.shape)}: expected [..., D] and [...]")
    if not pred.is_floating_point() or not table.is_floating_point():
        raise ValueError(f"pred and table must be floating point, got {pred.dtype} and {table.dtype}")
    if target_ids.is_floating_point() or target_ids.dtype == torch.bool:
        raise ValueError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
    ids = target_ids.reshape(-1).long()
    vocab = table.shape[0]
    out_of_range = (ids != ignore_index) & ((ids < 0) | (ids >= vocab))
    if ids.is_cuda:
        # Asynchronous device-side check: no host synchronisation.
        torch._assert_async(~out_of_range.any(), "continuous_loss: target id outside [0, V) (and not ignore_index)")
    elif out_of_range.any():
        bad = ids[out_of_range][:5].tolist()
        raise ValueError(
            f"target ids {bad} are outside the target table [0, {vocab}) and are not ignore_index={ignore_index}: "
            "the tokenizer and the target table disagree (rebuild targets for this tokenizer)"
        )
    return pred.reshape(-1, pred.shape[-1]), ids


def reduce_rows(loss_rows: torch.Tensor, valid: torch.Tensor, reduction: str, shape: torch.Size) -> torch.Tensor:
    """mean over the non-ignored rows (0 if there are none, no NaN), sum, or per row in `shape`."""
    if reduction == "none":
        return loss_rows.reshape(shape)
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1)


def continuous_loss(
    pred: torch.Tensor,
    target_ids: torch.Tensor,
    table: torch.Tensor,
    kind: str,
    reduction: str = "mean",
    ignore_index: int = -100,
    impl: str = "auto",
    **params,
) -> torch.Tensor:
    """Continuous-output loss of predictions pred [..., D] against rows table[target_ids] [..., D].

    Returns a float32 scalar (mean over non-ignored positions, or sum) or, for reduction="none", a
    tensor shaped like target_ids with 0 at ignored positions. Gradients reach pred and, when it
    requires grad (learned targets), the table. params: see LossParams (`loss_params(cfg.loss)`).
    """
    check_kind(kind)
    check_reduction(reduction)
    loss_params = LossParams.from_kwargs(params)
    pred2d, ids = flatten_inputs(pred, target_ids, table, ignore_index)
    if use_triton(impl, pred.device, loss_params):
        from pretrain_kernels.pointwise import triton_continuous_loss

        return triton_continuous_loss(pred2d, ids, table, kind, loss_params, reduction, ignore_index, target_ids.shape)
    loss_rows = reference.per_token_loss(pred2d, ids, table, kind, loss_params, ignore_index)
    return reduce_rows(loss_rows, ids != ignore_index, reduction, target_ids.shape)
