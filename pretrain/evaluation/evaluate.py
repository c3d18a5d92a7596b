"""Validation metrics: run the model over validation batches, decode, and count hits.

For each batch the objective picks the target positions (masked: the 80/10/10 corruption, drawn
per sequence from a generator seeded by eval.seed and the sequence's own tokens, so every checkpoint
sees the identical masked positions whatever the batch size or number of ranks; causal: every next
token). At those positions:

  continuous head: the predicted vector is decoded by nearest-neighbour search over the target table
                   (FAISS); top-1/top-5 accuracy, mean cosine to the target row, the training loss;
  softmax head:    top-1/top-5 of the logits (argmax), the training loss (cross-entropy) and the
                   perplexity exp(mean NLL).

Everything is accumulated as sums (and a histogram of the targets, for the majority-token baseline);
with several ranks they are all-reduced once at the end (one collective, so ranks with different
batch counts cannot hang).
"""
from __future__ import annotations

import hashlib
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from pretrain.evaluation.decoder import NearestNeighbourDecoder
from pretrain.model import IGNORE_INDEX

# Additive counters (summed over batches, then over ranks).
SUM_KEYS = (
    "batches", "sequences", "tokens", "top1", "top5", "topk", "loss_sum", "cos_sum",
    "decode_vectors", "decode_seconds", "recall_queries", "recall1_sum", "recallk_sum",
)


@dataclass
class EvalResult:
    metrics: dict
    # This rank's first sequences: (model input ids [L], labels [L], top-1 predicted id per position [L]).
    examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def all_reduce_totals(sums: dict[str, float], target_counts: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """Sum the counters and the per-token target counts over the ranks in one collective (no-op alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums, target_counts
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.cat([torch.tensor([sums[key] for key in SUM_KEYS], dtype=torch.float64), target_counts.double()]).to(device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values = values.cpu()
    return dict(zip(SUM_KEYS, values[: len(SUM_KEYS)].tolist())), values[len(SUM_KEYS):]


def corrupt_per_sequence(objective, raw: dict, seed: int) -> dict:
    """The objective applied row by row, each row's masks seeded by (seed, its tokens)."""
    rows = []
    for input_ids, doc_ids in zip(raw["input_ids"], raw["doc_ids"]):
        digest = hashlib.blake2b(input_ids.numpy().tobytes(), digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        rows.append(objective({"input_ids": input_ids[None], "doc_ids": doc_ids[None]}, generator))
    return {key: torch.cat([row[key] for row in rows]) for key in ("input_ids", "doc_ids", "labels")}


def _top_ids(outputs: torch.Tensor, model, decoder: Optional[NearestNeighbourDecoder], k: int) -> torch.Tensor:
    """Top-k token ids [N, k] on the CPU: nearest rows of the table, or the largest logits."""
    if model.continuous:
        return decoder.search(outputs, k)[1]
    return outputs.topk(k, dim=-1).indices.cpu()


@torch.no_grad()
def evaluate(
    model,
    batches: Iterable[dict],
    *,
    decoder: Optional[NearestNeighbourDecoder] = None,
    topk: int = 5,
    seed: int = 0,
    max_batches: int = 0,
    num_examples: int = 0,
    recall_queries: int = 4096,
    progress: bool = False,
) -> EvalResult:
    """Metrics of ``model`` (a PretrainModel) over ``batches`` ({"input_ids", "doc_ids"} from the loader).

    ``decoder`` is required for the continuous head (its table must be the model's target table).
    With an approximate index, its recall against the exact search is measured on up to
    ``recall_queries`` predicted vectors per rank.
    """
    if model.continuous and decoder is None:
        raise ValueError("the continuous head needs a NearestNeighbourDecoder over its target table")
    vocab_size = decoder.vocab_size if model.continuous else model.head.weight.shape[0]
    k = min(max(5, topk), vocab_size)
    device = next(model.parameters()).device
    model.eval()
    sums = dict.fromkeys(SUM_KEYS, 0.0)
    target_counts = torch.zeros(vocab_size, dtype=torch.float64)  # for the majority-token baseline
    examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    recall_pool: list[torch.Tensor] = []
    total = len(batches) if hasattr(batches, "__len__") else None
    if max_batches:
        total = min(total, max_batches) if total is not None else max_batches
    bar = tqdm(itertools.islice(batches, max_batches or None), desc="eval", unit="batch", total=total, disable=not progress)
    for raw in bar:
        batch = corrupt_per_sequence(model.objective, raw, seed)
        input_ids, doc_ids, labels = (batch[key].to(device) for key in ("input_ids", "doc_ids", "labels"))
        hidden = model.encode(input_ids, doc_ids)
        flat_labels = labels.reshape(-1)
        rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
        targets = flat_labels[rows]
        sums["batches"] += 1
        sums["sequences"] += input_ids.shape[0]
        if rows.numel() == 0:
            continue
        outputs = model.head(hidden.reshape(-1, hidden.shape[-1])[rows]).float()
        if not torch.isfinite(outputs).all():
            raise ValueError("the model produced NaN/inf outputs on validation data: the checkpoint has diverged; "
                             "evaluate an earlier one (--tag)")
        sums["loss_sum"] += float(model.loss_from_outputs(outputs, targets)["loss"]) * rows.numel()

        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        top_ids = _top_ids(outputs, model, decoder, k)
        sums["decode_seconds"] += time.perf_counter() - start
        sums["decode_vectors"] += rows.numel()

        targets_cpu = targets.cpu()
        target_counts += torch.bincount(targets_cpu, minlength=vocab_size).double()
        hits = top_ids == targets_cpu[:, None]
        sums["tokens"] += rows.numel()
        sums["top1"] += float(hits[:, 0].sum())
        sums["top5"] += float(hits[:, :5].any(dim=1).sum())
        sums["topk"] += float(hits[:, :topk].any(dim=1).sum())
        if model.continuous:
            table = model.target_table
            sums["cos_sum"] += float(F.cosine_similarity(outputs, table[targets].float(), dim=-1).sum())
            if decoder.index_kind != "flat" and sum(len(p) for p in recall_pool) < recall_queries:
                recall_pool.append(outputs.cpu())

        if len(examples) < num_examples:
            predicted = torch.full_like(flat_labels, IGNORE_INDEX).cpu()
            predicted[rows.cpu()] = top_ids[:, 0]
            predicted = predicted.view_as(labels)
            for row in range(min(num_examples - len(examples), input_ids.shape[0])):
                examples.append((input_ids[row].cpu(), labels[row].cpu(), predicted[row]))
        if progress and sums["tokens"]:
            bar.set_postfix(top1=f"{sums['top1'] / sums['tokens']:.3f}", refresh=False)

    if recall_pool:
        pool = torch.cat(recall_pool)[:recall_queries]
        recall = decoder.recall_against_exact(pool, k)
        sums["recall_queries"] = len(pool)
        sums["recall1_sum"] = recall["recall@1"] * len(pool)
        sums["recallk_sum"] = recall[f"recall@{k}"] * len(pool)
    sums, target_counts = all_reduce_totals(sums, target_counts)
    metrics = _metrics(sums, model, decoder, topk, k, vocab_size)
    # Baseline a model must beat: always answering the most frequent target piece.
    metrics["majority_top1"] = float(target_counts.max()) / metrics["tokens"]
    return EvalResult(metrics=metrics, examples=examples)


def _metrics(sums: dict, model, decoder, topk: int, k: int, vocab_size: int) -> dict:
    tokens = sums["tokens"]
    if tokens == 0:
        raise ValueError(
            f"no target positions in {int(sums['batches'])} validation batches: the validation split is empty "
            f"or all padding; prepare the data with a larger data.valid_fraction"
        )
    metrics = {
        "head": "continuous" if model.continuous else "softmax",
        "decoding": "nearest-neighbour" if model.continuous else "argmax",
        "tokens": int(tokens),
        "sequences": int(sums["sequences"]),
        "batches": int(sums["batches"]),
        "vocab_size": vocab_size,
        "chance_top1": 1.0 / vocab_size,
        "top1": sums["top1"] / tokens,
        "top5": sums["top5"] / tokens,
        "loss": sums["loss_sum"] / tokens,
    }
    if topk not in (1, 5):
        metrics[f"top{min(topk, k)}"] = sums["topk"] / tokens
    seconds = sums["decode_seconds"]
    metrics["decode"] = {
        # Per process: the summed vectors over the summed search time of all ranks.
        "vectors_per_s": sums["decode_vectors"] / seconds if seconds > 0 else math.inf,
        "vectors": int(sums["decode_vectors"]),
        "seconds": seconds,
        **(decoder.describe() if model.continuous else {"method": "torch.topk over logits"}),
    }
    if model.continuous:
        metrics["mean_cosine"] = sums["cos_sum"] / tokens
        if sums["recall_queries"]:
            metrics["decode"]["recall_against_exact"] = {
                "queries": int(sums["recall_queries"]),
                "recall@1": sums["recall1_sum"] / sums["recall_queries"],
                f"recall@{k}": sums["recallk_sum"] / sums["recall_queries"],
            }
    else:
        # The softmax head's loss is the mean cross-entropy, i.e. the NLL: no second pass over the logits.
        metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))
    return metrics
