"""Edge cases of the losses where float32 used to break: c = ±1 in the syn-margins, zero rows, huge
norms, κ → 0 of the exact normaliser. Kernel (Triton interpreter), reference in float32 and float64,
and an analytic value must agree."""
import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

import pretrain_kernels as pk
from pretrain_kernels.vmf_normaliser import log_cm_approx

IGNORE = -100
SYN_MARGINS = ("syn_margin_orth", "syn_margin_diff")


def _table(v=11, d=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(v, d, generator=gen, dtype=torch.float64), dim=-1).float()


def _loss_rows_and_grad(pred, ids, table, kind, impl, dtype=torch.float32, **params):
    leaf = pred.to(dtype).detach().requires_grad_(True)
    rows = pk.continuous_loss(leaf, ids, table.to(dtype), kind, "none", IGNORE, impl=impl, **params)
    rows.sum().backward()
    return rows.detach().double(), leaf.grad.double()


def _all_paths(pred, ids, table, kind, **params):
    yield "kernel fp32", _loss_rows_and_grad(pred, ids, table, kind, "triton", **params)
    yield "reference fp32", _loss_rows_and_grad(pred, ids, table, kind, "reference", **params)
    yield "reference fp64", _loss_rows_and_grad(pred, ids, table, kind, "reference", torch.float64, **params)


@pytest.mark.parametrize("kind", SYN_MARGINS)
@pytest.mark.parametrize("margin", [0.5, 1.5])
def test_syn_margins_at_c_equal_to_plus_and_minus_one(kind, margin):
    # pred = ∓3·E[y]: c = ∓1, where the textbook u = normalise(μ − …) is normalised rounding noise.
    # Limits: u_orth: γ + √(1 − c²) − c; u_diff: γ + √((1 − c)/2) − c  →  c = −1: γ+1 / γ+2; c = +1: γ − 1.
    table = _table()
    ids = torch.arange(8) % table.shape[0]
    scales = torch.tensor([-3.0, -0.2, -40.0, -3.0, 3.0, 0.2, 40.0, 3.0])
    pred = scales[:, None] * table[ids]
    at_minus_one = margin + (1.0 if kind == "syn_margin_orth" else 2.0)
    want = torch.where(scales < 0, at_minus_one, max(margin - 1.0, 0.0)).double()
    for path, (rows, grad) in _all_paths(pred, ids, table, kind, margin=margin):
        torch.testing.assert_close(rows, want, atol=2e-6, rtol=0, msg=f"{kind} γ={margin} {path}")
        # At the cone's tip the subgradient is taken without u's slope: what is left is −∂c/∂p ≈ 0.
        assert torch.isfinite(grad).all() and grad.abs().max() < 1e-3, path


@pytest.mark.parametrize("kind", SYN_MARGINS)
def test_syn_margins_near_the_tip_follow_the_float64_formula(kind):
    # μ at angle θ from ±ê_t for θ down to 1e-3 rad: every path within float32 of the analytic loss.
    table = _table(v=4, d=32, seed=1)
    ids = torch.zeros(12, dtype=torch.long)
    target = table[0].double()
    ortho = F.normalize(torch.randn(32, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - target * 0.3, dim=0)
    ortho = F.normalize(ortho - (ortho @ target) * target, dim=0)
    angles = torch.tensor([1e-3, 1e-2, 0.3, 1.2, math.pi - 1.2, math.pi - 0.3, math.pi - 1e-2, math.pi - 1e-3] + [0.7] * 4, dtype=torch.float64)
    pred = (torch.cos(angles)[:, None] * target + torch.sin(angles)[:, None] * ortho) * 2.5
    c = torch.cos(angles)
    negative = torch.sqrt(1 - c**2) if kind == "syn_margin_orth" else torch.sqrt((1 - c) / 2)
    want = torch.relu(0.5 + negative - c)
    for path, (rows, _) in _all_paths(pred.float(), ids, table, kind):
        torch.testing.assert_close(rows, want, atol=2e-5, rtol=0, msg=f"{kind} {path}")


@pytest.mark.parametrize("kind", SYN_MARGINS)
def test_a_zero_prediction_row_costs_gamma_on_every_path(kind):
    # Defined value (docs/kernels.md): a zero row has no direction (μ = 0 as F.normalize leaves it), so
    # c = 0 and μ·u = 0: loss = γ. The kernel used to give γ + 1 (orth) where the reference gave γ.
    table = _table()
    ids = torch.tensor([0, 1, 2])
    pred = torch.zeros(3, table.shape[1])
    pred[2] = table[5] * 2.0
    for path, (rows, grad) in _all_paths(pred, ids, table, kind, margin=0.4):
        torch.testing.assert_close(rows[:2], torch.full((2,), 0.4, dtype=torch.float64), atol=1e-6, rtol=0, msg=path)
        assert torch.isfinite(grad).all(), path


# The kernel's plain Σx² overflows before the rescaled norm is selected (numpy warns in the interpreter).
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_huge_prediction_norms_stay_finite_and_match():
    # ‖p‖ = 1e20..1e30: Σp² overflows float32 (κ was inf → NaN for l2); κ² overflows in the closed form.
    table = _table(v=6, d=64)
    ids = torch.arange(6)
    direction = F.normalize(table[ids] + 0.5 * table[(ids + 1) % 6], dim=-1)
    pred = direction * torch.tensor([1e20, 1e25, 1e30, 1e20, 3e37, 1.0])[:, None]
    for kind in ("cosine", "l2", "syn_margin_orth"):
        kernel, _ = _loss_rows_and_grad(pred, ids, table, kind, "triton")
        ref64, _ = _loss_rows_and_grad(pred, ids, table, kind, "reference", torch.float64)
        torch.testing.assert_close(kernel, ref64, atol=1e-5, rtol=0, msg=kind)
    # vMF: −log C_m(κ) − pᵀe ≈ κ(1 − c) + O(log κ); compare with the float64 closed form.
    kernel, grad = _loss_rows_and_grad(pred, ids, table, "vmf", "triton")
    ref64, _ = _loss_rows_and_grad(pred, ids, table, "vmf", "reference", torch.float64)
    assert torch.isfinite(kernel).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(kernel, ref64, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("approx", ["debye", "paper", "paper_fixed"])
def test_float32_closed_form_is_finite_for_kappa_up_to_float32_max(approx):
    kappa = torch.tensor([1e18, 1e20, 1e30, 3e38])
    got = log_cm_approx(kappa, 300, approx)
    want = log_cm_approx(kappa.double(), 300, approx)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_exact_vmf_on_an_all_zero_row_is_the_kappa_to_zero_limit():
    table = _table(v=5, d=16)
    pred = torch.zeros(2, 16, requires_grad=True)
    rows = pk.continuous_loss(pred, torch.tensor([0, 3]), table, "vmf", "none", vmf_exact=True)
    rows.sum().backward()
    mpmath.mp.dps = 40
    # −log C_16(0) = 8·log 2π − 7·log 2 − log Γ(8): the density of the uniform distribution on S^15.
    want = float(8 * mpmath.log(2 * mpmath.pi) - 7 * mpmath.log(2) - mpmath.loggamma(8))
    torch.testing.assert_close(rows, torch.full((2,), want), rtol=1e-6, atol=0)
    torch.testing.assert_close(pred.grad, -table[[0, 3]])  # ∂(−pᵀe)/∂p; the normaliser's slope is 0 at κ = 0


@pytest.fixture(scope="module")
def bessel_oracle():
    """m -> (κ grid 1e-3..1e4, −log C_m(κ), I_{m/2}/I_{m/2−1}) from mpmath at 60 digits."""
    mpmath.mp.dps = 60
    kappas = [10.0 ** (k / 4) for k in range(-12, 17)]  # 29 points, 4 per decade
    out = {}
    for m in (16, 300):
        v = mpmath.mpf(m) / 2 - 1
        neg_log_cm, ratio = [], []
        for k in kappas:
            k = mpmath.mpf(k)
            iv = mpmath.besseli(v, k)
            neg_log_cm.append(float(mpmath.mpf(m) / 2 * mpmath.log(2 * mpmath.pi) + mpmath.log(iv) - v * mpmath.log(k)))
            ratio.append(float(mpmath.besseli(v + 1, k) / iv))
        out[m] = (torch.tensor(kappas, dtype=torch.float64), torch.tensor(neg_log_cm, dtype=torch.float64), torch.tensor(ratio, dtype=torch.float64))
    return out


@pytest.mark.parametrize("m", [16, 300])
def test_kernel_vmf_normaliser_from_kappa_1e_3_to_1e4_against_mpmath(m, bessel_oracle):
    # vmf_reg2 with λ2 = 0 is the normaliser alone: loss −log C_m(κ), gradient (Bessel ratio)·μ. Bounds:
    # the Debye form's documented error plus float32 rounding of its terms; dropping any term of the
    # closed form exceeds them.
    from pretrain_kernels import tolerances

    kappas, want_value, want_ratio = bessel_oracle[m]
    gen = torch.Generator().manual_seed(m)
    table = F.normalize(torch.randn(2, m, generator=gen, dtype=torch.float64), dim=-1).float()
    direction = F.normalize(torch.randn(m, generator=gen, dtype=torch.float64), dim=0).float().double()
    pred = (kappas[:, None] * direction).float()
    ids = torch.zeros(len(kappas), dtype=torch.long)
    got_value, grad = _loss_rows_and_grad(pred, ids, table, "vmf_reg2", "triton", vmf_lambda2=0.0)
    v = m / 2 - 1
    s = torch.hypot(kappas, torch.tensor(v, dtype=torch.float64))
    float32_budget = 8 * 2.0**-24 * (s + v * torch.log(v + s) + 1)
    value_err = (got_value - want_value).abs()
    assert torch.all(value_err <= tolerances.bound_for(tolerances.DEBYE_VALUE_ERR, m) + float32_budget), value_err.max()
    got_ratio = grad @ direction
    ratio_err = ((got_ratio - want_ratio) / want_ratio).abs()
    assert torch.all(ratio_err <= tolerances.bound_for(tolerances.RATIO_REL_ERR["debye"], m) + 1e-5), ratio_err.max()
