"""Is a target table usable for nearest-neighbour decoding, and does it carry meaning?

- effective_rank: exp(entropy of the normalised singular values), in [1, D]; 1 = collapsed to a line.
- mean_pairwise_cosine: over all pairs i != j; near 1 = collapsed, near 0 = spread out.
- self_retrieval: fraction of ids whose nearest row (cosine, FAISS as in decoding) is their own;
  must be 1.0, or some pieces can never be decoded. duplicate_rows lists the offenders.
- context_agreement: do nearest neighbours in the table occur in similar contexts in the corpus,
  compared with random pairs of pieces? (PPMI co-occurrence vectors, cosine.)
"""
from __future__ import annotations

from typing import Iterable, Sequence

import faiss
import numpy as np
import scipy.sparse as sp
import torch

# Two rows whose cosines to a query differ by less than this are indistinguishable in float32 decoding.
DUPLICATE_TOLERANCE = 1e-6


def _unit_numpy(table: torch.Tensor) -> np.ndarray:
    x = table.detach().to("cpu", torch.float32)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return np.ascontiguousarray(x.numpy())


def effective_rank(table: torch.Tensor) -> float:
    """exp(H(p)) with p = singular values / their sum (Roy & Vetterli 2007); on the table's device."""
    s = torch.linalg.svdvals(table.detach().to(torch.float64))
    p = s / s.sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def mean_pairwise_cosine(table: torch.Tensor) -> float:
    """Exact mean of cos(i, j) over i != j in O(V*D): |sum of unit rows|^2 = V + sum_{i!=j} cos."""
    x = torch.from_numpy(_unit_numpy(table)).double()
    v = x.shape[0]
    if v < 2:
        return 1.0
    total = x.sum(0).pow(2).sum()
    return float((total - v) / (v * (v - 1)))


def _index(x: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def nearest_other(table: torch.Tensor, query_ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each query id: (own cosine, best cosine to another id, that id)."""
    x = _unit_numpy(table)
    ids = np.arange(len(x)) if query_ids is None else np.asarray(query_ids, dtype=np.int64)
    scores, found = _index(x).search(x[ids], 2)
    # The query itself is normally the first hit; with an exact duplicate it may come second.
    other_first = found[:, 0] != ids
    best_other = np.where(other_first, found[:, 0], found[:, 1])
    best_score = np.where(other_first, scores[:, 0], scores[:, 1])
    own = np.einsum("ij,ij->i", x[ids], x[ids])
    return own, best_score, best_other


def self_retrieval(table: torch.Tensor, query_ids: Sequence[int] | None = None) -> float:
    """Fraction of (query) ids that retrieve themselves strictly before any other id."""
    own, best, _ = nearest_other(table, query_ids)
    return float(np.mean(own - best > DUPLICATE_TOLERANCE)) if len(own) else 1.0


def duplicate_rows(table: torch.Tensor, query_ids: Sequence[int] | None = None) -> list[tuple[int, int, float]]:
    """(id, the id it collides with, cosine) for every id that is not strictly its own nearest row."""
    own, best, other = nearest_other(table, query_ids)
    ids = np.arange(len(own)) if query_ids is None else np.asarray(query_ids)
    bad = np.nonzero(own - best <= DUPLICATE_TOLERANCE)[0]
    return [(int(ids[i]), int(other[i]), float(best[i])) for i in bad]


def nearest_neighbours(table: torch.Tensor, ids: Sequence[int], k: int = 5) -> list[list[tuple[int, float]]]:
    """The k nearest other ids (with cosine) of each id, best first."""
    x = _unit_numpy(table)
    ids = np.asarray(ids, dtype=np.int64)
    scores, found = _index(x).search(x[ids], k + 1)
    out = []
    for row_id, row_scores, row_found in zip(ids, scores, found):
        out.append([(int(j), float(s)) for j, s in zip(row_found, row_scores) if j != row_id][:k])
    return out


# Context agreement --------------------------------------------------------------------------------

def ppmi_cooccurrence(documents: Iterable[np.ndarray], vocab_size: int, window: int = 2) -> sp.csr_matrix:
    """Positive PMI of (piece, context piece) counts within +-window positions, as a sparse V x V matrix."""
    rows, cols = [], []
    for doc in documents:
        doc = np.asarray(doc, dtype=np.int64)
        for offset in range(1, window + 1):
            if len(doc) > offset:
                rows += [doc[:-offset], doc[offset:]]
                cols += [doc[offset:], doc[:-offset]]
    if not rows:
        return sp.csr_matrix((vocab_size, vocab_size), dtype=np.float64)
    r, c = np.concatenate(rows), np.concatenate(cols)
    counts = sp.coo_matrix((np.ones(len(r)), (r, c)), shape=(vocab_size, vocab_size)).tocsr()
    counts.sum_duplicates()
    row_tot = np.asarray(counts.sum(1)).ravel()
    col_tot = np.asarray(counts.sum(0)).ravel()
    coo = counts.tocoo()
    pmi = np.log(coo.data * counts.sum() / (row_tot[coo.row] * col_tot[coo.col]))
    keep = pmi > 0
    return sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=counts.shape)


def _row_cosines(m: sp.csr_matrix, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.asarray(m.multiply(m).sum(1)).ravel())
    dots = np.asarray(m[a].multiply(m[b]).sum(1)).ravel()
    return dots / np.maximum(norms[a] * norms[b], 1e-12)


def context_agreement(
    table: torch.Tensor, ppmi: sp.csr_matrix, query_ids: Sequence[int], *, seed: int = 0
) -> dict[str, float]:
    """Mean context (PPMI) cosine of each query with its table neighbour vs with a random other query.

    The neighbour is searched among the queries only, so both pairs are drawn from the same pool
    (frequent pieces have denser context vectors than rare ones): a random table scores ~0.
    """
    query_ids = np.asarray(query_ids, dtype=np.int64)
    if len(query_ids) < 2:
        raise ValueError("context_agreement needs at least 2 query ids")
    _, _, position = nearest_other(table[torch.as_tensor(query_ids)])
    neighbour = query_ids[position]
    rng = np.random.default_rng(seed)
    shift = rng.integers(1, len(query_ids), size=len(query_ids))  # never the query itself
    partner = query_ids[(np.arange(len(query_ids)) + shift) % len(query_ids)]
    nn_cos = _row_cosines(ppmi, query_ids, neighbour)
    rand_cos = _row_cosines(ppmi, query_ids, partner)
    return {
        "neighbour_context_cosine": float(nn_cos.mean()),
        "random_context_cosine": float(rand_cos.mean()),
        "margin": float(nn_cos.mean() - rand_cos.mean()),
        "queries": int(len(query_ids)),
    }


def table_report(
    table: torch.Tensor,
    *,
    pieces: Sequence[str] | None = None,
    frequent_ids: Sequence[int] = (),
    k: int = 5,
    max_duplicates: int = 50,
) -> dict:
    """The collapse / distinguishability diagnostics, plus neighbours of the given frequent ids."""
    dups = duplicate_rows(table)
    name = (lambda i: pieces[i]) if pieces is not None else str
    report = {
        "vocab_size": int(table.shape[0]),
        "dim": int(table.shape[1]),
        "effective_rank": effective_rank(table),
        "mean_pairwise_cosine": mean_pairwise_cosine(table),
        "self_retrieval": 1.0 - len(dups) / max(table.shape[0], 1),
        "duplicates": len(dups),
        "duplicate_examples": [{"id": i, "piece": name(i), "collides_with": j, "with_piece": name(j), "cosine": c} for i, j, c in dups[:max_duplicates]],
    }
    if len(frequent_ids):
        neighbours = nearest_neighbours(table, frequent_ids, k)
        report["neighbours"] = {name(i): [[name(j), round(c, 3)] for j, c in nn] for i, nn in zip(frequent_ids, neighbours)}
    return report


def format_report(report: dict) -> str:
    """Human-readable summary for the terminal."""
    lines = [
        f"vocab {report['vocab_size']} x dim {report['dim']}: effective rank {report['effective_rank']:.1f}, "
        f"mean pairwise cosine {report['mean_pairwise_cosine']:.3f}, self-retrieval {report['self_retrieval']:.4f} "
        f"({report['duplicates']} duplicates)"
    ]
    for d in report.get("duplicate_examples", [])[:5]:
        lines.append(f"  duplicate: {d['piece']!r} ~ {d['with_piece']!r} (cos {d['cosine']:.6f})")
    for piece, nn in report.get("neighbours", {}).items():
        lines.append(f"  {piece!r:>14} -> " + ", ".join(f"{p!r} {c:.2f}" for p, c in nn))
    return "\n".join(lines)
