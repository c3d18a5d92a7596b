"""Continuous-output losses (Triton kernels + PyTorch references); imports as `pretrain_kernels`.

    continuous_loss(pred, target_ids, table, kind, reduction="mean", ignore_index=-100, impl="auto", **params)
    fused_linear_continuous_loss(hidden, weight, bias, target_ids, table, kind, chunk_size, ...)
    LOSS_NAMES, loss_params(cfg.loss) -> params

impl="auto" runs the Triton kernels on CUDA and the plain-PyTorch reference elsewhere. The Triton
modules (pointwise, max_margin) are imported only when used, so this package imports without triton.
See docs/kernels.md.
"""
from pretrain_kernels.fused_linear import fused_linear_continuous_loss, fused_linear_loss_and_grads
from pretrain_kernels.losses import continuous_loss, triton_available
from pretrain_kernels.params import LOSS_NAMES, WHOLE_TABLE_LOSSES, LossParams, loss_params
from pretrain_kernels.vmf_normaliser import log_cm, log_cm_approx, log_cm_exact

__all__ = [
    "LOSS_NAMES",
    "LossParams",
    "WHOLE_TABLE_LOSSES",
    "continuous_loss",
    "fused_linear_continuous_loss",
    "fused_linear_loss_and_grads",
    "log_cm",
    "log_cm_approx",
    "log_cm_exact",
    "loss_params",
    "triton_available",
]
