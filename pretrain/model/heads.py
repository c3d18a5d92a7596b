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
