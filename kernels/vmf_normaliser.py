"""log C_m(κ), the von Mises-Fisher normaliser, exact and in closed form.

    C_m(κ) = κ^v / ((2π)^{m/2} · I_v(κ)),   v = m/2 − 1,   m = D
    d/dκ log C_m(κ) = −I_{v+1}(κ) / I_v(κ)        (minus the Bessel ratio, in (−1, 0))

Exact (float64, CPU, for tests and the CPU path): SciPy's exponentially scaled ``ive`` wherever it is
representable, and the power series of I_v in log space where ``ive`` underflows (large m, small κ;
e.g. m=1024 for κ ≲ 117). Accurate to ~1e-13 relative for m ≤ 2048, κ in [1e-3, 1e5] (tested against
mpmath).

Closed forms (float32-friendly, sqrt/log only, so a GPU kernel computes value and derivative with no
host round trip) — see docs/kernels.md for the measured error table:

* ``debye`` (default): the uniform asymptotic (Debye) expansion of I_v to second order. It approximates
  log C_m itself (not up to a constant): abs error ≤ 6e-7 for m ≥ 64, ≤ 6e-4 for m ≥ 8.
* ``paper``: Kumar & Tsvetkov (2019) code, −log C_m(κ) ≈ √((v+1)²+κ²) − (v−1)·log(v−1+√((v+1)²+κ²)),
  **up to an additive constant in m** (hundreds of nats): its values are not the NLL.
* ``paper_fixed``: the variant with (v−1)² under the square root (a public reimplementation); also up
  to a constant.

The paper forms' κ-derivative is κ / (v−1+√(a²+κ²)), a = v±1: a closed-form bound on the Bessel ratio.
"""
from __future__ import annotations

import math

import numpy as np
import torch

APPROXIMATIONS = ("debye", "paper", "paper_fixed")
DEBYE_MIN_DIM = 8
LOG_2PI = math.log(2.0 * math.pi)
# Below this ive() is denormal or zero: switch to the series (which is exact there and converges fast).
_IVE_TINY = 1e-280


# --------------------------------------------------------------------------------------------------
# Exact, float64 NumPy / SciPy
# --------------------------------------------------------------------------------------------------

def _log_series(v: float, kappa: np.ndarray) -> np.ndarray:
    """log Σ_k x^k / (k! (v+1)_k), x = κ²/4: the I_v(κ) series without its (κ/2)^v/Γ(v+1) factor.

    All terms are positive, so summing them in log space (running max) neither cancels nor overflows.
    """
    log_x = 2.0 * np.log(kappa / 2.0)
    x = np.exp(log_x)
    # Terms grow until k(v+k) ≈ x, then shrink geometrically.
    k_peak = 0.5 * (-v + np.sqrt(v * v + 4.0 * x))
    log_term = np.zeros_like(kappa)
    log_sum = np.zeros_like(kappa)
    k = 0
    while True:
        k += 1
        log_term = log_term + log_x - math.log(k) - np.log(v + k)
        log_sum = np.logaddexp(log_sum, log_term)
        if k > k_peak.max() and np.all(log_term - log_sum < -40.0):
            return log_sum
        if k > 10_000_000:  # pragma: no cover - only for κ far beyond the supported range
            raise ValueError(f"exact log C_m: Bessel series did not converge for v={v}, max κ={kappa.max():.3g}")


def log_bessel_iv_and_ratio(v: float, kappa: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log I_v(κ) − v·log κ, I_{v+1}(κ)/I_v(κ), mask of points computed by the series), float64.

    log I_v is returned without its v·log κ term, which log C_m cancels analytically (no underflow).
    """
    from scipy.special import ive, gammaln

    kappa = np.asarray(kappa, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
        ive_v = ive(v, kappa)
        ive_v1 = ive(v + 1.0, kappa)
    use_series = ~((ive_v > _IVE_TINY) & (ive_v1 > _IVE_TINY) & np.isfinite(ive_v) & np.isfinite(ive_v1))
    log_iv_minus = np.empty_like(kappa)
    ratio = np.empty_like(kappa)
    scipy_ok = ~use_series
    log_iv_minus[scipy_ok] = np.log(ive_v[scipy_ok]) + kappa[scipy_ok] - v * np.log(kappa[scipy_ok])
    ratio[scipy_ok] = ive_v1[scipy_ok] / ive_v[scipy_ok]
    if use_series.any():
        k = kappa[use_series]
        log_s_v = _log_series(v, k)
        log_s_v1 = _log_series(v + 1.0, k)
        log_iv_minus[use_series] = -v * math.log(2.0) - gammaln(v + 1.0) + log_s_v
        ratio[use_series] = np.exp(np.log(k / 2.0) - math.log(v + 1.0) + log_s_v1 - log_s_v)
    return log_iv_minus, ratio, use_series


def log_cm_exact_numpy(m: int, kappa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log C_m(κ), d/dκ log C_m(κ)) in float64, exact (see module docstring)."""
    from scipy.special import gammaln

    _check_dim(m)
    kappa = np.asarray(kappa, dtype=np.float64)
    if np.any(~np.isfinite(kappa)) or np.any(kappa < 0):
        raise ValueError("exact log C_m(κ) needs finite κ ≥ 0 (the norm of a prediction is inf or NaN)")
    v = m / 2.0 - 1.0
    # κ = 0 (an all-zero prediction): the finite limit, I_v(κ)/κ^v → 1/(2^v Γ(v+1)), ratio → 0.
    log_iv_minus = np.full_like(kappa, -v * math.log(2.0) - gammaln(v + 1.0))
    ratio = np.zeros_like(kappa)
    positive = kappa > 0
    if positive.any():
        log_iv_minus[positive], ratio[positive], _ = log_bessel_iv_and_ratio(v, kappa[positive])
    return -(m / 2.0) * LOG_2PI - log_iv_minus, -ratio


class _LogCmExact(torch.autograd.Function):
    """Exact log C_m(κ) for autograd. Copies κ to the host (a device sync on GPU): CPU and tests."""

    @staticmethod
    def forward(ctx, kappa: torch.Tensor, m: int) -> torch.Tensor:
        value, deriv = log_cm_exact_numpy(m, kappa.detach().to("cpu", torch.float64).numpy())
        ctx.save_for_backward(torch.from_numpy(deriv).to(kappa.device, kappa.dtype))
        return torch.from_numpy(value).to(kappa.device, kappa.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (deriv,) = ctx.saved_tensors
        return grad_out * deriv, None


def log_cm_exact(kappa: torch.Tensor, m: int) -> torch.Tensor:
    """Exact log C_m(κ) (differentiable; d/dκ = −I_{m/2}/I_{m/2−1})."""
    return _LogCmExact.apply(kappa, m)


# --------------------------------------------------------------------------------------------------
# Closed forms, torch (the reference path; the Triton kernels implement the same formulas)
# --------------------------------------------------------------------------------------------------

def _check_dim(m: int) -> None:
    if not isinstance(m, int) or m < 2:
        raise ValueError(f"vMF normaliser: the dimension m must be an int ≥ 2, got {m!r}")


def check_approx(name: str, m: int) -> None:
    if name not in APPROXIMATIONS:
        raise ValueError(f"unknown vMF approximation {name!r}; choose one of {', '.join(APPROXIMATIONS)}")
    _check_dim(m)
    if m < 4:
        # v = m/2 − 1 < 1: the Debye form diverges as κ → 0 (m=2) and the paper's log(v−1+…) is undefined.
        raise ValueError(
            f"the closed-form vMF normaliser needs D ≥ 4 (got D={m}); set loss.vmf_exact=true or use a larger targets.dim"
        )
    if name == "debye" and m < DEBYE_MIN_DIM:
        # Measured: its κ-derivative (the gradient) is off by up to 118% at κ = 1e-3 for m = 4..7.
        raise ValueError(
            f"the Debye closed form of the vMF normaliser needs D ≥ {DEBYE_MIN_DIM} (got D={m}; its gradient is off "
            "by up to 118% below that); set loss.vmf_exact=true (exact Bessel) or use a larger targets.dim"
        )


def _debye_terms(kappa: torch.Tensor, v: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, t², P) of the Debye expansion: s = √(v²+κ²), t = v/s, P = 1 + u1(t)/v + u2(t)/v²,
    written with t/v = 1/s so that v = 0 needs no division."""
    s = torch.hypot(kappa, kappa.new_tensor(v))  # not √(v²+κ²): κ² overflows float32 from κ ≈ 1.8e19
    t2 = (v / s) ** 2
    poly = 1.0 + (3.0 - 5.0 * t2) / (24.0 * s) + (81.0 - 462.0 * t2 + 385.0 * t2 * t2) / (1152.0 * s * s)
    return s, t2, poly


def _paper_root(kappa: torch.Tensor, v: float, approx: str) -> torch.Tensor:
    """√(a²+κ²) with a = v+1 (paper) or v−1 (paper_fixed)."""
    a = v + 1.0 if approx == "paper" else v - 1.0
    return torch.hypot(kappa, kappa.new_tensor(a))


def log_cm_approx(kappa: torch.Tensor, m: int, approx: str = "debye") -> torch.Tensor:
    """Closed-form log C_m(κ); for ``paper``/``paper_fixed`` this is up to an additive constant in m."""
    check_approx(approx, m)
    v = m / 2.0 - 1.0
    if approx == "debye":
        # log I_v(κ) ≈ s + v·log(κ/(v+s)) − ½·log(2πs) + log P; the v·log κ cancels in log C_m.
        s, _, poly = _debye_terms(kappa, v)
        return -s + v * torch.log(v + s) + 0.5 * torch.log(s) - (m / 2.0 - 0.5) * LOG_2PI - torch.log(poly)
    root = _paper_root(kappa, v, approx)
    return -(root - (v - 1.0) * torch.log(v - 1.0 + root))


def dlog_cm_approx(kappa: torch.Tensor, m: int, approx: str = "debye") -> torch.Tensor:
    """Closed-form d/dκ of ``log_cm_approx`` (what the kernels use; tested against autograd)."""
    check_approx(approx, m)
    v = m / 2.0 - 1.0
    if approx == "debye":
        s, t2, poly = _debye_terms(kappa, v)
        # d/dκ of −log P: P'(t)·v·κ/(s³P), with P'(t)·v = (3−15t²)/24 + (162−1848t²+2310t⁴)/(1152 s).
        dpoly = (3.0 - 15.0 * t2) / 24.0 + (162.0 - 1848.0 * t2 + 2310.0 * t2 * t2) / (1152.0 * s)
        return -kappa / (v + s) + kappa / (2.0 * s * s) + kappa * dpoly / (s * s * s * poly)
    return -kappa / (v - 1.0 + _paper_root(kappa, v, approx))


def log_cm(kappa: torch.Tensor, m: int, exact: bool = False, approx: str = "debye") -> torch.Tensor:
    """log C_m(κ): exact (host round trip) or the chosen closed form (differentiable either way)."""
    return log_cm_exact(kappa, m) if exact else log_cm_approx(kappa, m, approx)
