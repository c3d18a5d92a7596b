"""The continuous model's training forward never calls .nonzero() (a host sync per step on a GPU)."""
import pytest
import torch

from pretrain.model import Objective, batch_generator, build_model
from tests.engine.test_model import VOCAB, make_batch, make_cfg, table  # noqa: F401 - table is a fixture


@pytest.mark.parametrize("fused", [False, True])
def test_continuous_forward_has_no_nonzero_host_sync(fused, table, monkeypatch):
    # .nonzero() waits for the GPU every step; the continuous losses skip ignored rows themselves.
    # impl=triton: the GPU path (Triton's interpreter here); the CPU reference gathers rows itself.
    torch.manual_seed(0)
    model = build_model(make_cfg(loss={"fused_head": fused, "chunk_size": 4, "impl": "triton"}), VOCAB, table)
    batch = Objective("masked", VOCAB, 0.3)(make_batch(), batch_generator(0, 1, 0, 0))
    want = model(batch)

    def refuse(*args, **kwargs):
        raise AssertionError("nonzero() called in the continuous forward")

    monkeypatch.setattr(torch.Tensor, "nonzero", refuse)
    got = model(batch)
    for key in ("loss", "mean_cos", "mean_pred_norm", "n_targets"):
        torch.testing.assert_close(got[key], want[key])
