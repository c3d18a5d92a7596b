"""The optimizer: lazy row-wise AdamW for the sparse input embedding, fused AdamW for the rest."""
import copy

import pytest
import torch

from pretrain.config import load_config
from pretrain.engine.optim import RowSparseAdamW, build_optimizer, clip_grad_norm, grad_norm
from pretrain.model import build_model

HYPER = {"lr": 0.05, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.1}


def _embedding_pair(vocab=12, width=5):
    torch.manual_seed(0)
    sparse, dense = torch.nn.Embedding(vocab, width, sparse=True), torch.nn.Embedding(vocab, width)
    dense.weight.data.copy_(sparse.weight.data)
    return sparse, dense


def _steps(embedding, optimizer, batches):
    for ids in batches:
        optimizer.zero_grad(set_to_none=True)
        (embedding(ids) ** 2 * torch.arange(1.0, ids.shape[-1] + 1)[:, None]).sum().backward()
        optimizer.step()


def test_touched_rows_follow_dense_adamw_and_untouched_rows_stay_put():
    """Rows in every batch: exactly torch's AdamW. Rows in no batch: unchanged (a dense AdamW decays them)."""
    sparse, dense = _embedding_pair()
    start = sparse.weight.detach().clone()
    batches = [torch.tensor([1, 4, 4, 7]), torch.tensor([7, 1, 4, 1]), torch.tensor([4, 7, 1, 1])]
    _steps(sparse, RowSparseAdamW(sparse.parameters(), **HYPER), batches)
    _steps(dense, torch.optim.AdamW(dense.parameters(), foreach=False, **HYPER), batches)
    touched = torch.tensor([1, 4, 7])
    untouched = torch.tensor([r for r in range(12) if r not in (1, 4, 7)])
    torch.testing.assert_close(sparse.weight[touched], dense.weight[touched], rtol=1e-6, atol=1e-7)
    assert not torch.equal(sparse.weight[touched], start[touched])
    assert torch.equal(sparse.weight[untouched], start[untouched])
    assert not torch.allclose(dense.weight[untouched], start[untouched])  # weight decay moved them


def test_a_row_missing_from_one_batch_keeps_its_moments_until_it_returns():
    """Lazy semantics: row 3 skips step 2; its moments are those of one update, not decayed twice."""
    sparse, _ = _embedding_pair()
    optimizer = RowSparseAdamW(sparse.parameters(), **HYPER)
    _steps(sparse, optimizer, [torch.tensor([3, 5])])
    moments = optimizer.state[sparse.weight]["exp_avg"][3].clone()
    _steps(sparse, optimizer, [torch.tensor([5, 6])])
    assert torch.equal(optimizer.state[sparse.weight]["exp_avg"][3], moments)
    assert not torch.equal(optimizer.state[sparse.weight]["exp_avg"][5], moments)


def test_state_dict_round_trip_resumes_the_same_updates():
    """Exact resume at the optimizer level: save after step 2, load into a fresh one, step 3 identical."""
    batches = [torch.tensor([1, 2]), torch.tensor([2, 9]), torch.tensor([9, 1, 3])]
    sparse, _ = _embedding_pair()
    optimizer = RowSparseAdamW(sparse.parameters(), **HYPER)
    _steps(sparse, optimizer, batches[:2])
    saved_weights, saved_state = sparse.weight.detach().clone(), copy.deepcopy(optimizer.state_dict())
    _steps(sparse, optimizer, batches[2:])
    resumed, _ = _embedding_pair()
    resumed.weight.data.copy_(saved_weights)
    fresh = RowSparseAdamW(resumed.parameters(), **HYPER)
    fresh.load_state_dict(saved_state)
    _steps(resumed, fresh, batches[2:])
    assert torch.equal(resumed.weight, sparse.weight)


def test_a_nan_in_the_sparse_gradient_skips_the_whole_step():
    sparse, dense = _embedding_pair()
    linear = torch.nn.Linear(5, 1)
    optimizer = RowSparseAdamW([*sparse.parameters(), *linear.parameters()], **HYPER)
    before = [p.detach().clone() for p in (sparse.weight, linear.weight)]
    (linear(sparse(torch.tensor([2, 3]))).sum() * float("nan")).backward()
    optimizer.step()
    assert optimizer.skipped_last_step
    assert all(torch.equal(p, b) for p, b in zip((sparse.weight, linear.weight), before))


def test_grad_norm_counts_a_sparse_gradient_like_its_dense_twin():
    sparse, dense = _embedding_pair()
    ids = torch.tensor([1, 1, 4])
    sparse(ids).sum().backward()
    dense(ids).sum().backward()
    assert float(grad_norm([sparse.weight.grad])) == pytest.approx(float(dense.weight.grad.norm()))


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_scales_sparse_and_dense_gradients_as_torch_clips_their_dense_twins(max_norm):
    sparse, dense = _embedding_pair()
    linear = torch.nn.Linear(5, 1)
    twin = copy.deepcopy(linear)
    ids = torch.tensor([1, 1, 4, 9])
    linear(sparse(ids)).pow(2).sum().backward()
    twin(dense(ids)).pow(2).sum().backward()
    ours = [sparse.weight.grad, *(p.grad for p in linear.parameters())]
    theirs = [dense.weight, *twin.parameters()]
    norm = clip_grad_norm(ours, max_norm)
    assert float(norm) == pytest.approx(float(torch.nn.utils.clip_grad_norm_(theirs, max_norm)), rel=1e-6)
    assert (float(norm) > max_norm) == (max_norm == 0.5)  # one case clips, the other does not
    for mine, other in zip(ours, theirs):
        torch.testing.assert_close(mine.to_dense(), other.grad)


def test_sparse_embedding_config_builds_a_sparse_table_and_the_row_optimizer():
    cfg = load_config(None, ["train.sparse_embedding=true", "train.zero_stage=0"])
    model = build_model(cfg, 50, torch.nn.functional.normalize(torch.randn(50, cfg.targets.dim), dim=1))
    assert model.encoder.embed.tok_emb.sparse
    assert isinstance(build_optimizer(model.param_groups(0.0, 1e-3), cfg.train), RowSparseAdamW)


def test_sparse_embedding_refuses_zero_stages_that_densify_gradients():
    with pytest.raises(ValueError, match="train.sparse_embedding=true needs train.zero_stage=0"):
        load_config(None, ["train.sparse_embedding=true", "train.zero_stage=2"])


@pytest.mark.parametrize("zero_stage, replicas, pipeline, skipped", [(0, 1, False, True), (0, 2, False, False),
                                                                       (1, 1, False, False), (0, 1, True, False)])
def test_deepspeed_self_allreduce_is_skipped_only_for_one_unpartitioned_replica(zero_stage, replicas, pipeline, skipped):
    from types import SimpleNamespace

    from pretrain.engine.optim import skip_single_replica_allreduce

    engine = SimpleNamespace(enable_backward_allreduce=True, pipeline_parallelism=pipeline)
    assert skip_single_replica_allreduce(engine, zero_stage, replicas) is skipped
    assert engine.enable_backward_allreduce is not skipped
