"""Nearest-neighbour decoding: the predicted vector's closest rows of the target table (FAISS).

A continuous head predicts a vector ê; its token is the row of the target table E with the highest
cosine to ê (greedy, beam 1). Both sides are L2-normalised here, so the search is an exact inner
product over unit vectors (``IndexFlatIP``). Every continuous loss decodes this way: with unit-norm
target rows, ranking by cosine, by inner product and by L2 distance to ê give the same order.

Where the table lives:
  * ``cpu``     -- one CPU index;
  * ``gpu``     -- the whole table on one GPU;
  * ``sharded`` -- each visible GPU holds a slice of the rows (``index_cpu_to_all_gpus`` with
    ``shard=True``, which builds a ``faiss.IndexShards`` of per-GPU indexes whose ids run on from
    one slice to the next). ``cpu_shards > 1`` builds the same structure on the CPU;
  * ``auto``    -- sharded over several GPUs, one GPU, else CPU.
The GPU paths need a FAISS build with GPU support (``faiss-gpu``); the CPU wheel lacks
``StandardGpuResources`` / ``GpuMultipleClonerOptions``, so those are checked before use.

For very large vocabularies an approximate index (IVF or HNSW) trades recall for speed;
``recall_against_exact`` measures that recall against the exact index on the same queries.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Optional

import faiss
import numpy as np
import torch

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf", "hnsw"]
Placement = Literal["auto", "cpu", "gpu", "sharded"]
# IVF k-means wants about this many training points per list (FAISS warns below it).
_MIN_POINTS_PER_LIST = 39


def normalise_rows(vectors: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float32, C-contiguous, unit-L2 rows (what FAISS takes); zero rows stay zero."""
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().to(device="cpu", dtype=torch.float32).numpy()
    out = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if out.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors [N, D], got shape {tuple(out.shape)}")
    faiss.normalize_L2(out)
    return out


def gpu_faiss_available() -> bool:
    """True when this FAISS build can place indexes on a GPU and sees at least one."""
    return (
        hasattr(faiss, "StandardGpuResources")
        and hasattr(faiss, "GpuMultipleClonerOptions")
        and faiss.get_num_gpus() > 0
    )


def choose_placement(requested: Placement, index: IndexKind, *, num_gpus: int, world_size: int = 1) -> str:
    """Where the index goes: 'cpu', 'gpu' or 'sharded'.

    ``num_gpus`` is what this FAISS build can use (0 for faiss-cpu). With several processes
    (``world_size > 1``) each one already owns a GPU, so ``auto`` never shards across all of them.
    HNSW has no GPU implementation in FAISS: ``auto`` keeps it on the CPU.
    """
    if requested == "auto":
        if num_gpus == 0 or index == "hnsw":
            return "cpu"
        return "sharded" if num_gpus > 1 and world_size == 1 else "gpu"
    if requested in ("gpu", "sharded"):
        if num_gpus == 0:
            raise ValueError(
                f"eval.device={requested} needs FAISS with GPU support and a visible GPU, but this FAISS "
                f"build sees none (faiss-cpu, or no CUDA device): install faiss-gpu (pip install -e .[gpu]) "
                f"or set eval.device=auto / eval.device=cpu"
            )
        if index == "hnsw":
            raise ValueError(
                f"eval.index=hnsw has no GPU implementation in FAISS: set eval.device=cpu, or use "
                f"eval.index=ivf / eval.index=flat on the GPU"
            )
        return requested
    if requested == "cpu":
        return "cpu"
    raise ValueError(f"unknown eval.device {requested!r}: expected auto, cpu, gpu or sharded")


@dataclass(frozen=True)
class IndexParams:
    """Approximate-index settings (the `eval` config section's ivf_*/hnsw_* keys)."""

    ivf_nlist: int = 256
    ivf_nprobe: int = 16
    hnsw_m: int = 32
    hnsw_ef_search: int = 128


def build_cpu_index(table: np.ndarray, index: IndexKind, params: IndexParams) -> faiss.Index:
    """A CPU index over unit rows ``table`` [V, D], scored by inner product (= cosine)."""
    num_rows, dim = table.shape
    if index == "flat":
        built = faiss.IndexFlatIP(dim)
    elif index == "ivf":
        nlist = max(1, min(params.ivf_nlist, num_rows // _MIN_POINTS_PER_LIST))
        if nlist != params.ivf_nlist:
            log.warning(
                "eval.ivf_nlist=%d is too many lists for %d table rows; using %d (>= %d rows per list)",
                params.ivf_nlist, num_rows, nlist, _MIN_POINTS_PER_LIST,
            )
        built = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        built.train(table)
        built.nprobe = min(params.ivf_nprobe, nlist)
    elif index == "hnsw":
        built = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        built.hnsw.efSearch = params.hnsw_ef_search
    else:
        raise ValueError(f"unknown eval.index {index!r}: expected flat, ivf or hnsw")
    built.add(table)
    return built


def build_cpu_shards(table: np.ndarray, num_shards: int, index: IndexKind, params: IndexParams) -> faiss.IndexShards:
    """The table split into ``num_shards`` consecutive row slices, one index each.

    This is the structure ``index_cpu_to_all_gpus(..., co.shard=True)`` builds with one GPU per
    slice: every shard answers the query and the top-k lists are merged; ``successive_ids`` makes
    shard s number its rows from the start of its slice, so ids are rows of the full table.
    """
    num_rows = table.shape[0]
    if not 1 <= num_shards <= num_rows:
        raise ValueError(f"cannot split a table of {num_rows} rows into {num_shards} shards")
    shards = faiss.IndexShards(table.shape[1], True, True)  # threaded, successive_ids
    bounds = np.linspace(0, num_rows, num_shards + 1).astype(int)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        shards.add_shard(build_cpu_index(np.ascontiguousarray(table[start:stop]), index, params))  # FAISS keeps a reference
    return shards


def _to_gpu(cpu_index: faiss.Index, placement: str, gpu_id: int) -> tuple[faiss.Index, Optional[object]]:
    """The index cloned to the GPU(s), and the GPU resources that must live as long as it."""
    if placement == "sharded":
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        options.useFloat16 = False  # exact scores: the table is small next to GPU memory
        return faiss.index_cpu_to_all_gpus(cpu_index, co=options), None  # keeps its own resources
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, gpu_id, cpu_index), resources


class NearestNeighbourDecoder:
    """Top-k nearest rows of a target table for batches of predicted vectors.

    >>> decoder = NearestNeighbourDecoder(table)            # exact, placement chosen automatically
    >>> scores, ids = decoder.search(predictions, k=5)      # cosines and token ids, [N, 5] each
    """

    def __init__(
        self,
        table: torch.Tensor | np.ndarray,
        *,
        index: IndexKind = "flat",
        device: Placement = "auto",
        params: IndexParams = IndexParams(),
        cpu_shards: int = 1,
        gpu_id: int = 0,
        world_size: int = 1,
        search_batch: int = 16384,
        hub_bias: np.ndarray | None = None,
        rescore_candidates: int = 50,
    ) -> None:
        self.table = normalise_rows(table)
        if not np.isfinite(self.table).all():
            bad = int((~np.isfinite(self.table)).any(axis=1).sum())
            raise ValueError(f"target table has {bad} rows with NaN/inf values: rebuild it with `pretrain targets`")
        self.vocab_size, self.dim = self.table.shape
        self.hub_bias = None if hub_bias is None else check_hub_bias(hub_bias, self.vocab_size)
        self.rescore_candidates = rescore_candidates
        self.index_kind = index
        self.params = params
        self.search_batch = search_batch
        num_gpus = faiss.get_num_gpus() if gpu_faiss_available() else 0
        self.placement = choose_placement(device, index, num_gpus=num_gpus, world_size=world_size)
        if self.placement == "cpu" and cpu_shards > 1:
            self.index = build_cpu_shards(self.table, cpu_shards, index, params)
            self.placement = f"cpu-sharded({cpu_shards})"
        else:
            self.index = build_cpu_index(self.table, index, params)
            if self.placement in ("gpu", "sharded"):
                self.index, self._gpu_resources = _to_gpu(self.index, self.placement, gpu_id)
        log.info("decoder: %s index over %d x %d target rows on %s", index, self.vocab_size, self.dim, self.placement)

    @classmethod
    def from_config(cls, table, eval_cfg, *, gpu_id: int = 0, world_size: int = 1) -> "NearestNeighbourDecoder":
        params = IndexParams(eval_cfg.ivf_nlist, eval_cfg.ivf_nprobe, eval_cfg.hnsw_m, eval_cfg.hnsw_ef_search)
        return cls(table, index=eval_cfg.index, device=eval_cfg.device, params=params, gpu_id=gpu_id, world_size=world_size)

    def describe(self) -> dict:
        return {"index": self.index_kind, "placement": self.placement, "vocab_size": self.vocab_size, "dim": self.dim,
                "hub_aware": self.hub_bias is not None}

    def search(self, predictions: torch.Tensor | np.ndarray, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine scores (float32) and token ids (int64) of the k nearest rows, best first, [N, k] each."""
        if not 1 <= k <= self.vocab_size:
            raise ValueError(f"top-k must be between 1 and the table size {self.vocab_size}, got k={k}")
        queries = normalise_rows(predictions)
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"predicted vectors have dimension {queries.shape[1]} but the target table has {self.dim}: "
                f"the checkpoint and the target table (targets.path) do not belong together"
            )
        if not np.isfinite(queries).all():
            bad = int((~np.isfinite(queries)).any(axis=1).sum())
            raise ValueError(f"{bad} of {len(queries)} predicted vectors contain NaN/inf: the model has diverged")
        # Hub-aware decoding re-ranks a wider candidate list; the search itself is unchanged.
        width = k if self.hub_bias is None else min(max(k, self.rescore_candidates), self.vocab_size)
        scores = np.empty((len(queries), width), dtype=np.float32)
        ids = np.empty((len(queries), width), dtype=np.int64)
        for start in range(0, len(queries), self.search_batch):
            stop = start + self.search_batch
            scores[start:stop], ids[start:stop] = self.index.search(queries[start:stop], width)
        if self.hub_bias is not None:
            scores, ids = rescore(scores, ids, self.hub_bias, k)
        return torch.from_numpy(scores), torch.from_numpy(ids)

    def recall_against_exact(self, predictions: torch.Tensor | np.ndarray, k: int = 5) -> dict[str, float]:
        """Recall of this index against an exact flat index on the same queries.

        recall@k = share of the exact top-k ids that this index also returns in its top-k;
        recall@1 = share of queries whose best id is the exact best id.
        """
        exact = faiss.IndexFlatIP(self.dim)
        exact.add(self.table)
        _, exact_ids = exact.search(normalise_rows(predictions), k)
        _, found_ids = self.search(predictions, k)
        exact_ids = torch.from_numpy(exact_ids)
        return {"recall@1": float((found_ids[:, 0] == exact_ids[:, 0]).float().mean()), f"recall@{k}": recall_at_k(found_ids, exact_ids)}


def recall_at_k(found_ids: torch.Tensor, exact_ids: torch.Tensor) -> float:
    """Share of the exact top-k ids present in the found top-k lists (both [N, k]); -1 ids never match."""
    if found_ids.shape != exact_ids.shape:
        raise ValueError(f"id lists differ in shape: {tuple(found_ids.shape)} vs {tuple(exact_ids.shape)}")
    hits = (exact_ids[:, :, None] == found_ids[:, None, :]).any(dim=-1) & (exact_ids >= 0)
    return float(hits.float().mean())


def torch_topk(table_unit: torch.Tensor, predictions: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: cosine top-k by a plain matmul + topk. ``table_unit`` rows must already be unit
    norm (normalise once, as the index does at build time); query chunks bound the score matrix."""
    scores, ids = [], []
    for part in predictions.float().split(chunk):
        top = torch.topk(torch.nn.functional.normalize(part, dim=-1) @ table_unit.T, k, dim=-1)
        scores.append(top.values)
        ids.append(top.indices)
    return torch.cat(scores), torch.cat(ids)


# Hub-aware decoding --------------------------------------------------------------------------------
# A few table rows ("hubs", e.g. the most frequent piece) are the nearest neighbour of very many
# predictions. Both corrections below re-rank the exact top-`rescore_candidates` by
# cos(q, t) - bias[t], so they cost a gather and a sort of [N, candidates] on top of the search.

def check_hub_bias(bias: np.ndarray | torch.Tensor, vocab_size: int) -> np.ndarray:
    bias = np.asarray(bias.detach().cpu() if isinstance(bias, torch.Tensor) else bias, dtype=np.float32)
    if bias.shape != (vocab_size,):
        raise ValueError(f"hub bias has shape {bias.shape}, expected one value per table row ({vocab_size},): "
                         "fit it on this target table (csls_bias / frequency_prior_bias)")
    if not np.isfinite(bias).all():
        raise ValueError("hub bias contains NaN/inf: give every piece a non-zero count (frequency_prior_bias smooths with +1)")
    return bias


def rescore(scores: np.ndarray, ids: np.ndarray, bias: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each candidate list [N, C] by score - bias[id], best first."""
    adjusted = scores - bias[np.clip(ids, 0, None)]
    adjusted[ids < 0] = -np.inf  # FAISS pads short lists with id -1
    if k < adjusted.shape[1]:  # select the k best in linear time, then sort only those
        keep = np.argpartition(-adjusted, k - 1, axis=1)[:, :k]
        adjusted, ids = np.take_along_axis(adjusted, keep, 1), np.take_along_axis(ids, keep, 1)
    order = np.argsort(-adjusted, axis=1, kind="stable")
    return np.take_along_axis(adjusted, order, 1).astype(np.float32), np.take_along_axis(ids, order, 1)


def csls_bias(table: torch.Tensor | np.ndarray, predictions: torch.Tensor | np.ndarray, k: int = 10) -> np.ndarray:
    """CSLS local scaling (Conneau et al. 2018): r(t) = mean cosine of row t to its k nearest
    predictions; score 2·cos(q,t) − r(t) ranks like cos(q,t) − r(t)/2, so the bias is r/2.
    Fit it once on held-out predictions (no labels needed) and keep it with the table."""
    rows, queries = normalise_rows(table), normalise_rows(predictions)
    k = min(k, len(queries))
    if k < 1:
        raise ValueError("csls_bias needs at least one predicted vector to measure the rows' hubness")
    index = faiss.IndexFlatIP(queries.shape[1])
    index.add(queries)
    nearest, _ = index.search(rows, k)
    return (nearest.mean(axis=1) / 2).astype(np.float32)


def frequency_prior_bias(counts: torch.Tensor | np.ndarray, beta: float) -> np.ndarray:
    """Frequency prior score = cos + beta·log p(t), as a bias −beta·log p(t) (add-one smoothed counts).
    beta < 0 pushes predictions away from frequent pieces (an anti-hub prior); beta > 0 towards them."""
    counts = np.asarray(counts, dtype=np.float64) + 1.0
    return (-beta * np.log(counts / counts.sum())).astype(np.float32)
