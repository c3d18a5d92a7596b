"""log C_m(κ): the exact float64 path against SciPy and mpmath, and the closed forms' documented errors."""
import math

import mpmath
import numpy as np
import pytest
import scipy.special
import torch

from pretrain_kernels import tolerances
from pretrain_kernels.vmf_error_table import error_table
from pretrain_kernels.vmf_normaliser import (
    APPROXIMATIONS,
    DEBYE_MIN_DIM,
    _log_series,
    dlog_cm_approx,
    log_bessel_iv_and_ratio,
    log_cm_approx,
    log_cm_exact,
    log_cm_exact_numpy,
)

DIMS = (2, 3, 16, 64, 300, 512, 1024, 2048)
KAPPAS = np.logspace(-3, 5, 17)


def _close(got, want, rel=tolerances.EXACT_REL):
    scale = np.maximum(np.abs(want), 1.0)
    return np.abs(got - want) <= rel * scale


@pytest.fixture(scope="module")
def mpmath_oracle():
    """(log C_m, d/dκ log C_m) at 50 digits for every (m, κ) of the grid."""
    mpmath.mp.dps = 50
    out = {}
    for m in DIMS:
        v = mpmath.mpf(m) / 2 - 1
        values, derivs = [], []
        for k in KAPPAS:
            k = mpmath.mpf(float(k))
            iv, iv1 = mpmath.besseli(v, k), mpmath.besseli(v + 1, k)
            values.append(float(v * mpmath.log(k) - mpmath.mpf(m) / 2 * mpmath.log(2 * mpmath.pi) - mpmath.log(iv)))
            derivs.append(float(-iv1 / iv))
        out[m] = (np.array(values), np.array(derivs))
    return out


@pytest.mark.parametrize("m", DIMS)
def test_exact_matches_mpmath_over_the_whole_range(m, mpmath_oracle):
    value, deriv = log_cm_exact_numpy(m, KAPPAS)
    want_value, want_deriv = mpmath_oracle[m]
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(deriv))
    assert _close(value, want_value).all(), np.abs(value - want_value).max()
    assert (np.abs(deriv - want_deriv) <= tolerances.EXACT_REL * np.abs(want_deriv)).all()


@pytest.mark.parametrize("m", DIMS)
def test_exact_matches_scipy_wherever_scipy_is_finite(m):
    v = m / 2 - 1
    with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
        ive_v, ive_v1 = scipy.special.ive(v, KAPPAS), scipy.special.ive(v + 1, KAPPAS)
        scipy_value = v * np.log(KAPPAS) - m / 2 * math.log(2 * math.pi) - (np.log(ive_v) + KAPPAS)
        scipy_deriv = -ive_v1 / ive_v
    finite = np.isfinite(scipy_value) & np.isfinite(scipy_deriv) & (ive_v > 1e-300)
    value, deriv = log_cm_exact_numpy(m, KAPPAS)
    assert _close(value[finite], scipy_value[finite]).all()
    assert (np.abs(deriv[finite] - scipy_deriv[finite]) <= tolerances.EXACT_REL * np.abs(scipy_deriv[finite])).all()


def test_large_m_small_kappa_uses_the_series_where_scipy_underflows():
    kappa = np.array([1e-3, 1.0, 50.0, 1e3])
    _, _, series = log_bessel_iv_and_ratio(1023.0, kappa)
    assert series.tolist() == [True, True, True, False]
    value, _ = log_cm_exact_numpy(2048, kappa)
    assert np.all(np.isfinite(value))


@pytest.mark.parametrize("v, kappas", [(0.0, [0.01, 0.5, 3.0, 20.0]), (31.0, [0.5, 3.0, 20.0, 80.0]), (149.0, [20.0, 80.0, 200.0])])
def test_series_agrees_with_scipy_where_both_work(v, kappas):
    kappa = np.array(kappas)
    with np.errstate(under="raise"):
        want = np.log(scipy.special.ive(v, kappa)) + kappa - v * np.log(kappa / 2) + scipy.special.gammaln(v + 1)
    np.testing.assert_allclose(_log_series(v, kappa), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_exact_rejects_kappa_that_is_negative_or_not_finite(bad):
    with pytest.raises(ValueError, match="finite κ ≥ 0"):
        log_cm_exact_numpy(64, np.array([1.0, bad]))


@pytest.mark.parametrize("m", [4, 64, 1024])
def test_exact_at_kappa_zero_is_the_finite_limit(m):
    # An all-zero prediction row: log C_m(0) = −(m/2)·log 2π + v·log 2 + log Γ(v+1) (the uniform
    # density on the sphere), derivative 0; the point next to it is within its slope of that.
    v = m / 2 - 1
    want = -m / 2 * math.log(2 * math.pi) + v * math.log(2) + math.lgamma(v + 1)
    value, deriv = log_cm_exact_numpy(m, np.array([0.0, 1e-3]))
    assert value[0] == pytest.approx(want, rel=1e-14) and deriv[0] == 0.0
    assert abs(value[1] - value[0]) <= 1e-3 * abs(deriv[1]) + 1e-12


def test_exact_autograd_passes_gradcheck():
    kappa = torch.tensor([1e-3, 0.7, 12.0, 300.0, 4e4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: log_cm_exact(k, 300), (kappa,), eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("approx", APPROXIMATIONS)
@pytest.mark.parametrize("m", [4, 8, 64, 1024])
def test_closed_form_derivative_is_the_derivative_of_the_value(approx, m):
    # The kernels use the hand-written derivative; it must be the true derivative of the value.
    kappa = torch.logspace(-3, 5, 41, dtype=torch.float64).requires_grad_(True)
    if approx == "debye" and m < DEBYE_MIN_DIM:
        with pytest.raises(ValueError, match="vmf_exact=true"):
            log_cm_approx(kappa, m, approx)
        return
    (autograd_deriv,) = torch.autograd.grad(log_cm_approx(kappa, m, approx).sum(), kappa)
    torch.testing.assert_close(dlog_cm_approx(kappa.detach(), m, approx), autograd_deriv, rtol=1e-12, atol=1e-15)


@pytest.fixture(scope="module")
def measured():
    return {(r["m"], r["approx"]): r for r in error_table()}


def test_debye_value_error_is_within_the_documented_bound(measured):
    for (m, approx), row in measured.items():
        if approx == "debye" and m >= min(tolerances.DEBYE_VALUE_ERR):
            assert row["value_err"] <= tolerances.bound_for(tolerances.DEBYE_VALUE_ERR, m), row


def test_ratio_error_is_within_the_documented_bound(measured):
    for (m, approx), row in measured.items():
        if m >= min(tolerances.RATIO_REL_ERR[approx]):
            assert row["deriv_rel"] <= tolerances.bound_for(tolerances.RATIO_REL_ERR[approx], m), row


def test_debye_beats_both_circulating_variants_so_it_is_the_default(measured):
    # From m = 8 on (at m = 4 the paper's ratio is closer for κ → 0; docs/kernels.md).
    for m in {m for m, _ in measured if m >= 8}:
        debye = measured[(m, "debye")]
        for paper in ("paper", "paper_fixed"):
            assert debye["deriv_rel"] < measured[(m, paper)]["deriv_rel"]
            assert debye["spread"] < measured[(m, paper)]["spread"]
    # (v+1)² is the better of the two circulating forms for the gradient.
    assert all(measured[(m, "paper")]["deriv_rel"] < measured[(m, "paper_fixed")]["deriv_rel"] for m in {m for m, _ in measured})


def test_paper_forms_are_off_by_a_large_constant_debye_is_not(measured):
    assert measured[(300, "paper")]["offset"] > 100
    assert abs(measured[(300, "debye")]["offset"]) < 1e-8


@pytest.mark.parametrize("m", [2, 3])
def test_closed_forms_refuse_tiny_dimensions(m):
    with pytest.raises(ValueError, match="D ≥ 4"):
        log_cm_approx(torch.tensor([1.0]), m)
