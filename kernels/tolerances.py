"""The one place the numerical tolerances of the kernels and the vMF normaliser live.

Rule for the Triton kernels (Cut Cross-Entropy's): against a float64 ground truth computed from the
*same* (dtype-rounded) inputs, a kernel must be no worse than plain PyTorch at the same storage dtype,
plus a small slack:

    max|kernel − truth| ≤ max|torch_same_dtype − truth| + atol + rtol·max|truth|

compared tensor-wide (max norm), for the loss and for every input gradient. "Plain PyTorch at the same
storage dtype" is the reference computing in float32 from the dtype's inputs and returning gradients in
that dtype (what autocast does); not bf16 arithmetic throughout, whose closed-form vMF normaliser alone
is off by nats and would let a wrong kernel through (+5 nats passed the old bf16 check). The slack is
chosen by the dtype of the compared output: the loss is float32 for every input dtype, so it gets the
float32 slack, and a 1% change of the loss value fails every dtype's check (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


# Slack on top of the same-dtype PyTorch error, by the dtype of the output compared. bf16 outputs
# (gradients): one bf16 ulp (up to 2^-7 relative), since the interpreter rounds bf16 stores by truncation
# where torch rounds to nearest.
KERNEL_SLACK = {
    torch.float32: Tolerance(atol=1e-6, rtol=2e-6),
    torch.float64: Tolerance(atol=1e-12, rtol=1e-12),
    torch.bfloat16: Tolerance(atol=1e-6, rtol=2.0**-7),
}

# The reference losses in float64: torch.autograd.gradcheck's defaults.
GRADCHECK = Tolerance(atol=1e-5, rtol=1e-3)

# Exact log C_m(κ) and its κ-derivative vs SciPy / mpmath, float64, m ≤ 2048, κ ∈ [1e-3, 1e5]:
# |got − want| ≤ EXACT_REL · max(|want|, 1).
EXACT_REL = 1e-10

# Fused head + loss vs the unfused autograd graph (same float32 arithmetic, different summation order).
FUSED = {torch.float32: Tolerance(atol=1e-6, rtol=1e-5), torch.bfloat16: Tolerance(atol=1e-3, rtol=2e-2)}

# Closed-form log C_m: measured max abs error of the Debye form over κ ∈ [1e-3, 1e5], with a 2x margin
# (docs/kernels.md has the full table). Keys: the smallest m the bound holds from.
DEBYE_VALUE_ERR = {8: 1.2e-3, 16: 1e-4, 64: 1.1e-6, 300: 1e-8, 1024: 2.5e-10}
# Max relative error of the closed-form derivative (the Bessel ratio) per approximation, same range.
RATIO_REL_ERR = {
    "debye": {8: 3e-2, 16: 1e-3, 64: 2.5e-6, 300: 5e-9},
    "paper": {8: 0.34, 64: 3.3e-2, 300: 6.8e-3, 1024: 2e-3},
    "paper_fixed": {8: 1.01, 64: 6.7e-2, 300: 1.36e-2, 1024: 4e-3},
}


def bound_for(table: dict[int, float], m: int) -> float:
    """The bound of the largest key ≤ m (bounds shrink as m grows)."""
    keys = [k for k in table if k <= m]
    if not keys:
        raise KeyError(f"no documented bound for m={m} (smallest m: {min(table)})")
    return table[max(keys)]


def kernel_matches(got: torch.Tensor, truth: torch.Tensor, same_dtype: torch.Tensor) -> tuple[bool, str]:
    """Apply the rule above (slack by got's dtype); returns (ok, a message with the three errors)."""
    slack = KERNEL_SLACK[got.dtype]
    truth = truth.double()
    err = (got.double() - truth).abs().max().item()
    baseline = (same_dtype.double() - truth).abs().max().item()
    allowed = baseline + slack.atol + slack.rtol * truth.abs().max().item()
    return err <= allowed, f"kernel err {err:.3e}, same-dtype torch err {baseline:.3e}, allowed {allowed:.3e}"
