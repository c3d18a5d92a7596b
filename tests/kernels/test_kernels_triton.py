"""Triton kernels under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors vs the references.

Shapes are deliberately not multiples of the block sizes (N=47, D=300; 252×507), with ignored rows.
Tolerance rule: pretrain_kernels.tolerances (kernel vs float64 truth no worse than same-dtype torch).
"""
import pytest
import torch
import torch.nn.functional as F

import pretrain_kernels as pk
from pretrain_kernels import checks, max_margin, pointwise, reference, tolerances
from pretrain_kernels.params import LossParams

IGNORE = checks.IGNORE
_case = checks.make_case
_loss_and_grads = checks.loss_and_grads
_kernel = checks.kernel_fn
_compare_with_truth = checks.compare_with_truth
_brute_force_negatives = checks.brute_force_search_scores


def _check_against_truth(kind, pred, ids, table, reduction, params=LossParams()):
    for name, ok, message in _compare_with_truth(kind, pred, ids, table, reduction, params):
        assert ok, f"{kind} {pred.dtype} {reduction} {name}: {message}"


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", pk.LOSS_NAMES)
def test_kernel_matches_reference_on_odd_shapes(kind, dtype, reduction):
    pred, ids, table = _case(47, 300, 101, dtype)
    _check_against_truth(kind, pred, ids, table, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["cosine", "vmf", "margin", "syn_margin_orth"])
def test_the_check_rejects_a_loss_value_off_by_one_percent(kind, dtype):
    # The tolerance must catch a wrong value: the kernel's loss times 1.01 (gradients untouched) fails
    # in every dtype, and so does the kernel's vMF plus 5 nats, which the old bf16 rule let through.
    pred, ids, table = _case(47, 300, 101, dtype, seed=9)
    params = LossParams()
    real = _kernel(kind, ids, "mean", params)
    mutations = {"×1.01": lambda p, t: (lambda loss: loss + 0.01 * loss.detach())(real(p, t))}
    if kind == "vmf":
        mutations["+5 nats"] = lambda p, t: real(p, t) + 5.0
    assert all(ok for _, ok, _ in _compare_with_truth(kind, pred, ids, table, "mean", params)), "unmutated must pass"
    for label, mutated in mutations.items():
        verdicts = {name: (ok, message) for name, ok, message in _compare_with_truth(kind, pred, ids, table, "mean", params, mutated)}
        assert not verdicts["loss"][0], f"{kind} {dtype} loss {label} passed: {verdicts['loss'][1]}"
        assert verdicts["dpred"][0]  # only the value was changed


@pytest.mark.parametrize("kind", ["cosine", "vmf_practice", "margin"])
def test_kernel_on_252x507(kind):
    pred, ids, table = _case(252, 507, 131, torch.float32, seed=1)
    _check_against_truth(kind, pred, ids, table, "sum")


@pytest.mark.parametrize("approx", ["paper", "paper_fixed"])
def test_kernel_implements_the_circulating_vmf_forms_too(approx):
    pred, ids, table = _case(47, 300, 101, torch.float32, seed=2)
    _check_against_truth("vmf_reg1", pred, ids, table, "mean", LossParams(vmf_approx=approx, vmf_lambda1=0.3))


def test_gradient_to_pred_only_or_table_only():
    pred, ids, table = _case(47, 64, 50, torch.float32, seed=3)
    for pred_grad, table_grad in ((True, False), (False, True)):
        p, t = pred.clone().requires_grad_(pred_grad), table.clone().requires_grad_(table_grad)
        pk.continuous_loss(p, ids, t, "vmf", impl="triton").backward()
        p_ref, t_ref = pred.clone().requires_grad_(pred_grad), table.clone().requires_grad_(table_grad)
        pk.continuous_loss(p_ref, ids, t_ref, "vmf", impl="reference").backward()
        leaf, leaf_ref = (p, p_ref) if pred_grad else (t, t_ref)
        torch.testing.assert_close(leaf.grad, leaf_ref.grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            pk.continuous_loss(pred, ids, table, "vmf", impl="triton"), pk.continuous_loss(pred, ids, table, "vmf")
        )


def test_tiled_search_equals_brute_force():
    # V = 300 spans 3 vocabulary tiles (the last partial), D = 600 two D chunks; rows are not unit.
    pred, ids, table = _case(47, 600, 300, torch.float32, seed=4)
    table = table * torch.linspace(0.5, 2.0, 300)[:, None]
    got = max_margin.most_violating_negatives(pred, ids, table, IGNORE)
    want = _brute_force_negatives(pred, ids, table).argmax(dim=-1)
    valid = ids != IGNORE
    assert torch.equal(got[valid], want[valid])
    assert torch.equal(got[valid], reference.most_violating_negatives(pred, ids, table)[valid])
    # The GPU splits each row block's vocabulary over several programs (more programs than row blocks):
    # 2 and 3 ranges (the last short), reduced on the host side of the kernel, give the same ids.
    for splits in (2, 3):
        split_got = max_margin.most_violating_negatives(pred, ids, table, IGNORE, splits=splits)
        assert torch.equal(split_got[valid], want[valid]), splits


def test_tiled_search_in_bf16_picks_a_near_best_negative():
    pred, ids, table = _case(47, 300, 300, torch.bfloat16, seed=5)
    ok, message = checks.search_is_near_best(pred, ids, table, slack=2e-2)
    assert ok, message


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("kind, with_bias, learned", [("cosine", True, True), ("vmf_practice", False, False), ("margin", True, True)])
def test_fused_head_matches_the_unfused_graph(impl, kind, with_bias, learned):
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 47, 40, generator=gen)
    weight = torch.randn(300, 40, generator=gen) * 0.2
    bias = torch.randn(300, generator=gen) * 0.1 if with_bias else None
    _, ids, table = _case(94, 300, 101, torch.float32, seed=6)
    ids = ids.reshape(2, 47)
    leaves = [hidden, weight] + ([bias] if with_bias else []) + ([table] if learned else [])

    def grads(fused):
        inputs = [x.clone().requires_grad_(True) for x in leaves]
        h, w = inputs[0], inputs[1]
        b = inputs[2] if with_bias else None
        t = inputs[-1] if learned else table
        if fused:
            loss = pk.fused_linear_continuous_loss(h, w, b, ids, t, kind, chunk_size=16, reduction="sum", impl=impl)
        else:
            loss = pk.continuous_loss(F.linear(h, w, b), ids, t, kind, reduction="sum", impl="reference")
        loss.backward()
        return [loss.detach()] + [x.grad for x in inputs]

    tol = tolerances.FUSED[torch.float32]
    for got, want in zip(grads(True), grads(False)):
        torch.testing.assert_close(got, want, atol=tol.atol * max(1.0, want.abs().max().item()), rtol=tol.rtol)


def test_fused_head_in_bf16_and_its_errors():
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(47, 40, generator=gen).bfloat16().requires_grad_(True)
    weight = (torch.randn(300, 40, generator=gen) * 0.2).bfloat16().requires_grad_(True)
    _, ids, table = _case(47, 300, 101, torch.bfloat16, seed=7)
    loss = pk.fused_linear_continuous_loss(hidden, weight, None, ids, table, "cosine", chunk_size=10, impl="triton")
    loss.backward()
    want = pk.continuous_loss(F.linear(hidden.float(), weight.float()), ids, table.float(), "cosine")
    tol = tolerances.FUSED[torch.bfloat16]
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, want, atol=tol.atol, rtol=tol.rtol)
    with pytest.raises(ValueError, match="reduction 'mean' or 'sum'"):
        pk.fused_linear_continuous_loss(hidden, weight, None, ids, table, "cosine", reduction="none")
    with pytest.raises(ValueError, match="weight must be \\[D, H\\]"):
        pk.fused_linear_continuous_loss(hidden, weight.T, None, ids, table, "cosine")
    with pytest.raises(ValueError, match="chunk_size"):
        pk.fused_linear_continuous_loss(hidden, weight, None, ids, table, "cosine", chunk_size=0)


def test_rows_wider_than_the_kernel_limit_are_refused():
    with pytest.raises(ValueError, match="impl='reference'"):
        pointwise.block_sizes(pointwise.MAX_BLOCK_D + 1)


@pytest.mark.parametrize("kind", ["cosine", "vmf", "margin"])
def test_strided_inputs_give_the_contiguous_results(kind):
    # A column-sliced pred used to be written back with its own row stride into a dense gradient
    # buffer: out-of-bounds stores (heap corruption on CPU, illegal access on a GPU).
    pred, ids, table = _case(21, 40, 37, torch.float32, seed=8)
    results = checks.strided_layouts_match(kind, pred, ids, table)
    assert [layout for layout, _, _ in results] == ["column slice", "transpose", "row step"]
    for layout, ok, message in results:
        assert ok, f"{kind} {layout}: {message}"


def test_table_gradient_accumulates_into_the_callers_buffer():
    # The fused head passes one float32 [V, D] accumulator to every chunk (no V×D zeros per chunk).
    pred, ids, table = _case(47, 64, 50, torch.float32, seed=10)
    scale = torch.tensor(0.5)
    _, _, fresh = pointwise.loss_rows_and_grads(pred, ids, table, "margin", LossParams(), IGNORE, scale, want_table_grad=True)
    buffer = torch.ones(table.shape)
    _, _, returned = pointwise.loss_rows_and_grads(
        pred, ids, table, "margin", LossParams(), IGNORE, scale, want_table_grad=True, table_grad_out=buffer
    )
    assert returned is buffer
    torch.testing.assert_close(buffer, fresh + 1.0)
    with pytest.raises(ValueError, match="contiguous float32"):
        pointwise.loss_rows_and_grads(
            pred, ids, table, "cosine", LossParams(), IGNORE, want_table_grad=True, table_grad_out=buffer.double()
        )


def test_search_dot_precision_follows_torch_tf32_switch(monkeypatch):
    # On a GPU: bf16 tables use the native bf16 tl.dot; fp32 tables TF32 only when torch allows it.
    monkeypatch.setattr(max_margin, "interpreting", lambda: False)
    assert max_margin.dot_mode(torch.bfloat16) == "native"
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        assert max_margin.dot_mode(torch.float32) == "tf32"
        matmul.allow_tf32 = False
        assert max_margin.dot_mode(torch.float32) == "ieee"
    finally:
        matmul.allow_tf32 = before
    monkeypatch.setattr(max_margin, "interpreting", lambda: True)
    assert max_margin.dot_mode(torch.bfloat16) == "ieee"
