"""The continuous model's training forward never calls .nonzero() (a host sync per step on a GPU)."""
import pytest
import torch

import torch.nn.functional as F

from pretrain.config import config_from_dict
from pretrain.model import Objective, batch_generator, build_model

VOCAB, DIM, LENGTH = 60, 8, 12


def make_cfg(loss):
    return config_from_dict({"model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32, "max_seq_len": LENGTH},
                             "targets": {"dim": DIM}, "loss": {"name": "cosine", **loss}})


@pytest.fixture(scope="module")
def table():
    return F.normalize(torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(0)), dim=1)


def make_batch():
    ids = torch.randint(5, VOCAB, (3, LENGTH), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "doc_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize("fused", [False, True])
def test_continuous_forward_has_no_nonzero_host_sync(fused, table, monkeypatch):
    # .nonzero() waits for the GPU every step; the continuous losses skip ignored rows themselves.
    # impl=triton: the GPU path (Triton's interpreter here); the CPU reference gathers rows itself.
    torch.manual_seed(0)
    model = build_model(make_cfg({"fused_head": fused, "chunk_size": 4, "impl": "triton"}), VOCAB, table)
    batch = Objective("masked", VOCAB, 0.3)(make_batch(), batch_generator(0, 1, 0, 0))
    want = model(batch)

    def refuse(*args, **kwargs):
        raise AssertionError("nonzero() called in the continuous forward")

    monkeypatch.setattr(torch.Tensor, "nonzero", refuse)
    got = model(batch)
    for key in ("loss", "mean_cos", "mean_pred_norm", "n_targets"):
        torch.testing.assert_close(got[key], want[key])
