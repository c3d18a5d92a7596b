"""Reference losses: formulas, gradcheck in float64, the negative search, and the public API's contract."""
import typing

import pytest
import torch
import torch.nn.functional as F

import pretrain_kernels as pk
from pretrain.config import LossConfig, load_config
from pretrain_kernels import reference, tolerances
from pretrain_kernels.params import LossParams
from pretrain_kernels.vmf_normaliser import log_cm_exact


def _data(n=9, d=8, v=13, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(n, d, generator=gen, dtype=dtype) * 2
    table = F.normalize(torch.randn(v, d, generator=gen, dtype=dtype), dim=-1)
    ids = torch.randint(0, v, (n,), generator=gen)
    return pred, ids, table


@pytest.mark.parametrize("kind", pk.LOSS_NAMES)
def test_reference_gradients_pass_gradcheck_in_float64(kind):
    pred, ids, table = _data()
    ids[2] = -100
    pred.requires_grad_(True)
    table.requires_grad_(True)
    params = LossParams(vmf_exact=kind == "vmf")  # the exact normaliser's gradient too

    def loss(p, e):
        return reference.per_token_loss(p, ids, e, kind, params)

    assert torch.autograd.gradcheck(loss, (pred, table), eps=1e-6, atol=tolerances.GRADCHECK.atol, rtol=tolerances.GRADCHECK.rtol)


def test_formulas_against_independent_expressions():
    pred, ids, table = _data(n=32, d=16, v=50)
    cos = F.cosine_similarity(pred, table[ids], dim=-1)
    params = LossParams(margin=0.3)

    def per_token(kind, **kw):
        p = LossParams(**{**params.as_dict(), **kw})
        return reference.per_token_loss(pred, ids, table, kind, p).double()

    torch.testing.assert_close(per_token("cosine"), 1 - cos)
    torch.testing.assert_close(per_token("l2"), 2 - 2 * cos)
    torch.testing.assert_close(per_token("l2_raw"), ((pred - table[ids]) ** 2).sum(-1))
    # Synthetic negatives reduce to functions of the cosine: μ·u_orth = √(1−c²), μ·u_diff = √((1−c)/2).
    torch.testing.assert_close(per_token("syn_margin_orth"), torch.relu(0.3 + torch.sqrt(1 - cos**2) - cos))
    torch.testing.assert_close(per_token("syn_margin_diff"), torch.relu(0.3 + torch.sqrt((1 - cos) / 2) - cos))
    kappa, dot = pred.norm(dim=-1), (pred * table[ids]).sum(-1)
    neg_log_cm = -log_cm_exact(kappa, 16)
    torch.testing.assert_close(per_token("vmf", vmf_exact=True), neg_log_cm - dot)
    torch.testing.assert_close(per_token("vmf_reg1", vmf_exact=True, vmf_lambda1=0.5), neg_log_cm - dot + 0.5 * kappa)
    torch.testing.assert_close(per_token("vmf_reg2", vmf_exact=True, vmf_lambda2=0.25), neg_log_cm - 0.25 * dot)
    torch.testing.assert_close(
        per_token("vmf_practice", vmf_exact=True, vmf_lambda=0.2), neg_log_cm + torch.log(1 + kappa) * (0.2 - cos)
    )
    # The default closed form (Debye) is the NLL itself, not up to a constant.
    torch.testing.assert_close(per_token("vmf"), neg_log_cm - dot, atol=1e-3, rtol=0)


def test_margin_uses_the_brute_force_most_violating_negative(monkeypatch):
    pred, ids, table = _data(n=40, d=16, v=57, seed=3)
    cos_pred = F.normalize(pred, dim=-1) @ table.T
    cos_target = table[ids] @ table.T
    scores = cos_pred - cos_target
    scores[torch.arange(40), ids] = float("-inf")
    brute = scores.argmax(dim=-1)
    # A tiny budget forces many token chunks: same answer.
    monkeypatch.setattr(reference, "_SEARCH_SCORES_PER_CHUNK", 57 * 3)
    assert torch.equal(reference.most_violating_negatives(pred, ids, table), brute)
    want = torch.relu(0.5 + cos_pred[torch.arange(40), brute] - cos_pred[torch.arange(40), ids])
    got = reference.per_token_loss(pred, ids, table, "margin", LossParams())
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "vmf_practice", "margin"])
def test_reductions_ignore_index_and_shapes(kind):
    pred, ids, table = _data(n=12, d=16, v=20, dtype=torch.float32)
    pred3 = pred.reshape(3, 4, 16).requires_grad_(True)
    ids3 = ids.reshape(3, 4).clone()
    ids3[0, :2] = -100
    per_token = pk.continuous_loss(pred3, ids3, table, kind, reduction="none")
    assert per_token.shape == (3, 4) and per_token.dtype == torch.float32
    assert torch.all(per_token[0, :2] == 0)
    valid = ids3 != -100
    torch.testing.assert_close(pk.continuous_loss(pred3, ids3, table, kind, reduction="sum"), per_token.sum())
    mean = pk.continuous_loss(pred3, ids3, table, kind)
    torch.testing.assert_close(mean, per_token[valid].mean())
    mean.backward()
    assert torch.all(pred3.grad[0, :2] == 0) and pred3.grad[valid].abs().sum() > 0


def test_all_positions_ignored_gives_zero_not_nan():
    pred, _, table = _data(n=5, d=16, dtype=torch.float32)
    pred.requires_grad_(True)
    loss = pk.continuous_loss(pred, torch.full((5,), -100), table, "vmf")
    loss.backward()
    assert loss.item() == 0.0 and torch.all(pred.grad == 0)


def test_gradient_reaches_a_learned_table():
    pred, ids, table = _data(n=6, d=16, v=9, dtype=torch.float32)
    table.requires_grad_(True)
    pk.continuous_loss(pred, ids, table, "cosine").backward()
    touched = torch.zeros(9, dtype=torch.bool)
    touched[ids] = True
    assert torch.all(table.grad[~touched] == 0) and torch.all(table.grad[touched].abs().sum(-1) > 0)


def test_bfloat16_inputs_give_float32_loss_and_bfloat16_grad():
    pred, ids, table = _data(n=6, d=16, dtype=torch.bfloat16)
    pred.requires_grad_(True)
    loss = pk.continuous_loss(pred, ids, table, "vmf_practice")
    loss.backward()
    assert loss.dtype == torch.float32 and pred.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p, i, t: pk.continuous_loss(p, i, t, "softmax"), "unknown continuous loss 'softmax'"),
        (lambda p, i, t: pk.continuous_loss(p, i, t, "cosine", reduction="avg"), "reduction='avg'"),
        (lambda p, i, t: pk.continuous_loss(p, i, t, "cosine", impl="cuda"), "impl='cuda'"),
        (lambda p, i, t: pk.continuous_loss(p, i, t, "cosine", temperature=1.0), "unknown loss parameter"),
        (lambda p, i, t: pk.continuous_loss(p[:, :8], i, t, "cosine"), "prediction dim 8 != target table dim 16"),
        (lambda p, i, t: pk.continuous_loss(p, i[:3], t, "cosine"), "expected \\[..., D\\] and \\[...\\]"),
        (lambda p, i, t: pk.continuous_loss(p, i.float(), t, "cosine"), "integer tensor"),
        (lambda p, i, t: pk.continuous_loss(p, i + 100, t, "cosine"), "outside the target table \\[0, 20\\)"),
        (lambda p, i, t: pk.continuous_loss(p, i, t, "vmf", vmf_approx="bessel"), "vmf_approx='bessel'"),
        (lambda p, i, t: pk.continuous_loss(p, torch.zeros_like(i), t[:1], "margin"), "at least 2 rows"),
    ],
)
def test_bad_input_gets_a_clear_error(call, match):
    pred, ids, table = _data(n=6, d=16, v=20, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        call(pred, ids, table)


def test_vmf_closed_form_refuses_d_below_4_and_points_to_the_exact_one():
    pred, ids, table = _data(n=4, d=2, v=5, dtype=torch.float32)
    with pytest.raises(ValueError, match="vmf_exact=true"):
        pk.continuous_loss(pred, ids, table, "vmf")
    assert torch.isfinite(pk.continuous_loss(pred, ids, table, "vmf", vmf_exact=True))


def test_loss_names_and_params_follow_the_config():
    assert set(pk.LOSS_NAMES) == set(typing.get_args(LossConfig.model_fields["name"].annotation))
    cfg = load_config(None, ["loss.name=vmf_reg1", "loss.vmf_lambda1=0.5", "loss.vmf_approx=paper"])
    params = pk.loss_params(cfg.loss)
    assert params["vmf_lambda1"] == 0.5 and params["vmf_approx"] == "paper"
    assert set(params) == set(LossParams().as_dict())
    assert pk.loss_params({"margin": 0.1})["margin"] == 0.1
    pred, ids, table = _data(n=6, d=16, v=20, dtype=torch.float32)
    default = pk.continuous_loss(pred, ids, table, cfg.loss.name, **pk.loss_params(LossConfig()))
    assert pk.continuous_loss(pred, ids, table, cfg.loss.name, **params) != default


def test_auto_uses_the_reference_off_cuda(monkeypatch):
    from pretrain_kernels import losses

    assert losses.use_triton("auto", torch.device("cpu"), LossParams()) is False
    assert losses.use_triton("reference", torch.device("cuda"), LossParams()) is False
    assert losses.use_triton("auto", torch.device("cuda"), LossParams(vmf_exact=True)) is False
    with pytest.raises(ValueError, match="exact vMF normaliser"):
        losses.use_triton("triton", torch.device("cuda"), LossParams(vmf_exact=True))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        losses.use_triton("triton", torch.device("cpu"), LossParams())
    monkeypatch.setattr(losses, "triton_available", lambda: False)
    assert losses.use_triton("auto", torch.device("cuda"), LossParams()) is False
    with pytest.raises(ValueError, match="not installed"):
        losses.use_triton("triton", torch.device("cuda"), LossParams())
