"""Hub-aware decoding: the FAISS top-k re-ranked by cos - bias (CSLS local scaling, frequency prior)."""
import numpy as np
import pytest
import torch

from pretrain.evaluation.decoder import NearestNeighbourDecoder, csls_bias, frequency_prior_bias, rescore


def hub_case(seed=0, rows=200, dim=16, queries=400):
    """Row 0 is a hub: it lies near the mean direction of all predictions, so plain cosine picks it for
    many queries whose own row (true_ids) is only slightly less similar."""
    g = torch.Generator().manual_seed(seed)
    table = torch.nn.functional.normalize(torch.randn(rows, dim, generator=g), dim=1)
    mean_dir = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    table[0] = mean_dir
    true_ids = torch.randint(1, rows, (queries,), generator=g)
    predictions = table[true_ids] + 1.2 * mean_dir + 0.05 * torch.randn(queries, dim, generator=g)
    return table, predictions, true_ids


def test_zero_bias_gives_the_plain_search():
    table, predictions, _ = hub_case()
    plain = NearestNeighbourDecoder(table, device="cpu").search(predictions, 5)
    biased = NearestNeighbourDecoder(table, device="cpu", hub_bias=np.zeros(len(table), np.float32)).search(predictions, 5)
    assert torch.equal(plain[1], biased[1])
    torch.testing.assert_close(plain[0], biased[0])


def test_csls_breaks_the_hub_and_recovers_the_true_rows():
    table, predictions, true_ids = hub_case()
    plain = NearestNeighbourDecoder(table, device="cpu").search(predictions, 1)[1][:, 0]
    # Fitted on the predictions' geometry alone (no labels used), as the study does.
    bias = csls_bias(table, predictions, k=10)
    hub_aware = NearestNeighbourDecoder(table, device="cpu", hub_bias=bias).search(predictions, 1)[1][:, 0]
    assert (plain == 0).float().mean() > 0.5, "the case must have a hub for the test to mean anything"
    assert (hub_aware == 0).float().mean() < 0.1
    assert (hub_aware == true_ids).float().mean() > (plain == true_ids).float().mean() + 0.3
    assert bias.argmax() == 0  # the hub has the largest local density


def test_rescore_orders_by_score_minus_bias_and_skips_padding():
    scores = np.array([[0.9, 0.8, 0.7, 0.0]], np.float32)
    ids = np.array([[0, 1, 2, -1]])
    bias = np.array([0.5, 0.0, 0.05], np.float32)
    new_scores, new_ids = rescore(scores, ids, bias, k=3)
    assert new_ids.tolist() == [[1, 2, 0]]
    np.testing.assert_allclose(new_scores, [[0.8, 0.65, 0.4]], rtol=1e-6)


def test_frequency_prior_penalises_frequent_pieces_when_beta_is_negative():
    bias = frequency_prior_bias(np.array([1000, 10, 0]), beta=-0.1)
    assert bias[0] > bias[1] > bias[2]  # cos - bias: the frequent piece loses the most
    assert np.isfinite(bias).all()


def test_a_bias_of_the_wrong_size_is_refused_with_a_fix():
    table, _, _ = hub_case()
    with pytest.raises(ValueError, match="one value per table row"):
        NearestNeighbourDecoder(table, device="cpu", hub_bias=np.zeros(3, np.float32))
