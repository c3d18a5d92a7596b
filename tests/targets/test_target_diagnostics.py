"""Diagnostics: effective rank, mean cosine, self-retrieval / duplicates, neighbours, context agreement."""
import numpy as np
import pytest
import torch

from pretrain.targets import diagnostics as diag
from pretrain.targets.table import random_unit_table


def test_effective_rank_of_known_spectra():
    basis = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))[0]
    k_flat = basis[:, :5] @ torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]  # 5 equal singular values
    assert diag.effective_rank(k_flat) == pytest.approx(5.0, rel=1e-9)
    assert diag.effective_rank(torch.ones(20, 8)) == pytest.approx(1.0, abs=1e-6)
    x = torch.randn(40, 6, dtype=torch.float64)
    s = np.linalg.svd(x.numpy(), compute_uv=False)
    p = s / s.sum()
    assert diag.effective_rank(x) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)


def test_mean_pairwise_cosine_matches_brute_force():
    x = torch.randn(30, 5)
    u = x / x.norm(dim=1, keepdim=True)
    cos = u @ u.T
    expected = (cos.sum() - cos.diagonal().sum()) / (30 * 29)
    assert diag.mean_pairwise_cosine(x) == pytest.approx(float(expected), abs=1e-6)
    assert diag.mean_pairwise_cosine(torch.ones(7, 3)) == pytest.approx(1.0, abs=1e-6)


def test_self_retrieval_and_duplicates():
    table = random_unit_table(200, 16, seed=0)
    assert diag.self_retrieval(table) == 1.0 and diag.duplicate_rows(table) == []
    table[17] = table[101]
    table[5] = table[9] * 3.0  # same direction, other norm: still a duplicate under cosine
    assert diag.self_retrieval(table) == pytest.approx(196 / 200)
    dups = diag.duplicate_rows(table)
    assert sorted((i, j) for i, j, _ in dups) == [(5, 9), (9, 5), (17, 101), (101, 17)]
    assert all(c == pytest.approx(1.0, abs=1e-6) for _, _, c in dups)
    # query subsets (used by the learned-target diagnostics)
    assert diag.self_retrieval(table, [0, 1, 17]) == pytest.approx(2 / 3)


def test_nearest_neighbours_order():
    table = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5], [-1.0, 0.0]])
    nn = diag.nearest_neighbours(table, [0, 2], k=3)
    assert [j for j, _ in nn[0]] == [1, 3, 2]
    assert [j for j, _ in nn[1]] == [3, 1, 0]
    assert nn[0][0][1] == pytest.approx(0.9 / np.hypot(0.9, 0.1), abs=1e-6)


def test_context_agreement_separates_a_meaningful_table_from_a_random_one():
    # GROUPS groups of WORDS "words"; each group has its own 10 context ids, after the words.
    groups, words = 5, 8
    n_words = groups * words
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(5000):
        g = rng.integers(0, groups)
        context = lambda: n_words + 10 * g + rng.integers(0, 10)  # noqa: E731
        docs.append(np.array([context(), words * g + rng.integers(0, words), context()]))
    vocab = n_words + 10 * groups
    ppmi = diag.ppmi_cooccurrence(docs, vocab, window=1)
    assert ppmi.shape == (vocab, vocab) and ppmi.nnz > 0 and ppmi.data.min() > 0
    centres = torch.randn(groups, 8) * 5
    grouped = torch.cat([centres.repeat_interleave(words, 0) + torch.randn(n_words, 8), torch.randn(vocab - n_words, 8)])
    queries = list(range(n_words))
    good = diag.context_agreement(grouped, ppmi, queries)
    rand = [diag.context_agreement(random_unit_table(vocab, 8, seed=s), ppmi, queries)["margin"] for s in range(5)]
    # Same-group pairs share contexts (cosine ~0.9), others none; a random partner is same-group 7/39 of the time.
    assert good["neighbour_context_cosine"] > 0.8 and good["margin"] > 0.5
    assert abs(float(np.mean(rand))) < 0.15


def test_table_report_fields_and_names():
    table = random_unit_table(50, 8, seed=2)
    table[3] = table[4]
    pieces = [f"p{i}" for i in range(50)]
    report = diag.table_report(table, pieces=pieces, frequent_ids=[0, 1], k=2)
    assert report["duplicates"] == 2 and report["self_retrieval"] == pytest.approx(48 / 50)
    assert {d["piece"] for d in report["duplicate_examples"]} == {"p3", "p4"}
    assert list(report["neighbours"]) == ["p0", "p1"] and len(report["neighbours"]["p0"]) == 2
    assert 1.0 < report["effective_rank"] <= 8.0
    text = diag.format_report(report)
    assert "2 duplicates" in text and "'p3'" in text
