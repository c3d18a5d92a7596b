"""Output heads on top of the encoder: continuous (hidden -> D) and softmax (hidden -> V).

Both heads see the same encoder output, so the two are compared on equal terms; only the cost of
the last layer and its loss differ (D-dim vector + cosine/vMF/margin loss vs V logits + softmax).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ContinuousHead(nn.Module):
    """Predicts the target token's embedding; its norm is the vMF concentration, so no normalisation."""

    def __init__(self, d_model: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, dim)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class SoftmaxHead(nn.Module):
    """Logits over the vocabulary; optionally tied to the input embedding matrix (then bias-free).

    Under ZeRO-3 a tied weight is used outside its owning module's forward: the engine registers it
    with deepspeed.zero.register_external_parameter (see pretrain.engine.trainer).
    """

    def __init__(self, d_model: int, vocab_size: int, tied_embedding: nn.Embedding | None = None) -> None:
        super().__init__()
        self.tied = tied_embedding is not None
        if self.tied:
            # A plain attribute, not a submodule: the weight stays owned (and saved) by the encoder.
            object.__setattr__(self, "_tied_embedding", tied_embedding)
        else:
            self.proj = nn.Linear(d_model, vocab_size)
            nn.init.normal_(self.proj.weight, std=0.02)
            nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.tied:
            return F.linear(hidden, self._tied_embedding.weight)
        return self.proj(hidden)

    @property
    def weight(self) -> torch.Tensor:
        return self._tied_embedding.weight if self.tied else self.proj.weight


def frequency_cutoffs(counts: torch.Tensor, coverage: tuple[float, ...] = (0.8, 0.95)) -> list[int]:
    """Adaptive-softmax cluster boundaries (in frequency ranks): the head cluster holds the most
    frequent pieces that cover coverage[0] of the tokens, the next cluster up to coverage[1], and so on
    (Grave et al. 2017 size the head to cover ~80% of the text)."""
    vocab = counts.numel()
    share = torch.sort(counts.double(), descending=True).values.cumsum(0) / max(float(counts.sum()), 1.0)
    cutoffs: list[int] = []
    for level in coverage:
        cut = int(torch.searchsorted(share, torch.tensor(level, dtype=share.dtype))) + 1
        cut = min(max(cut, (cutoffs[-1] + 1) if cutoffs else 2), vocab - 1)
        if not cutoffs or cut > cutoffs[-1]:
            cutoffs.append(cut)
    return cutoffs


class AdaptiveSoftmaxHead(nn.Module):
    """torch.nn.AdaptiveLogSoftmaxWithLoss over pieces sorted by frequency (the classic large-vocabulary
    speed-up, and the peer the continuous head must beat). AdaptiveLogSoftmax wants class 0 to be the
    most frequent, so ids are mapped to frequency ranks and back.

    Training uses ``loss`` (only the clusters a target falls in are computed); ``forward`` gives the
    full log-probabilities in id order (evaluation: top-k, and cross-entropy of log-probs = NLL).
    """

    def __init__(self, d_model: int, counts: torch.Tensor, div_value: float = 4.0, cutoffs: list[int] | None = None) -> None:
        super().__init__()
        vocab = counts.numel()
        order = torch.sort(counts.double(), descending=True, stable=True).indices  # rank -> id
        rank_of_id = torch.empty(vocab, dtype=torch.long)
        rank_of_id[order] = torch.arange(vocab)
        self.register_buffer("rank_of_id", rank_of_id)
        self.cutoffs = cutoffs or frequency_cutoffs(counts)
        self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(d_model, vocab, self.cutoffs, div_value=div_value)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adaptive.log_prob(hidden)[..., self.rank_of_id]

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> dict:
        if labels.numel() == 0:
            zero = hidden.sum() * 0.0
            return {"loss": zero, "n_targets": labels.new_tensor(0)}
        return {"loss": self.adaptive(hidden.float(), self.rank_of_id[labels]).loss, "n_targets": labels.new_tensor(labels.numel())}
