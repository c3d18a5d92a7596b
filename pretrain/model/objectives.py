"""Training objectives: which positions predict which token.

masked: mask_prob of the non-pad positions become targets; of those 80% are replaced by <mask>,
        10% by a random ordinary token, 10% left unchanged (BERT's corruption).
causal: position t predicts token t+1, never across a document boundary nor into padding.
Positions without a target carry IGNORE_INDEX.

The corruption is drawn from an explicit torch.Generator, seeded per (seed, step, micro-batch, data
rank) by ``batch_generator``: a resumed run draws exactly the same masks, with no RNG state to carry.
"""
from __future__ import annotations

import torch

from pretrain.model.encoder import doc_ids_from_padding

IGNORE_INDEX = -100
# Special ids fixed by `pretrain prepare` (docs/INTERFACES.md); the manifest repeats them.
DEFAULT_SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}


def batch_generator(seed: int, step: int, micro_step: int, data_rank: int) -> torch.Generator:
    """A CPU generator unique to one micro-batch of one data-parallel rank."""
    # Distinct large odd multipliers keep (step, micro, rank) triples from colliding.
    mixed = (seed * 1_000_003 + step * 7_919 + micro_step * 104_729 + data_rank * 15_485_863) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def causal_labels(input_ids: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    same_doc = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, 1:] >= 0)
    labels[:, :-1] = torch.where(same_doc, input_ids[:, 1:], IGNORE_INDEX)
    return labels


def mask_tokens(input_ids: torch.Tensor, doc_ids: torch.Tensor, *, mask_prob: float, mask_id: int,
                vocab_size: int, first_ordinary_id: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted input_ids, labels) for the masked objective; tensors must be on the CPU."""
    shape = input_ids.shape
    chosen = (torch.rand(shape, generator=generator) < mask_prob) & (doc_ids >= 0)
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)
    action = torch.rand(shape, generator=generator)
    random_ids = torch.randint(first_ordinary_id, vocab_size, shape, generator=generator, dtype=input_ids.dtype)
    corrupted = torch.where(chosen & (action < 0.8), mask_id, input_ids)
    corrupted = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, corrupted)
    return corrupted, labels


class Objective:
    """Turns a loader batch {"input_ids", "doc_ids"} into model inputs with "labels"."""

    def __init__(self, kind: str, vocab_size: int, mask_prob: float, special_ids: dict | None = None) -> None:
        if kind not in ("masked", "causal"):
            raise ValueError(f"model.objective must be 'masked' or 'causal', got {kind!r}")
        self.kind = kind
        self.vocab_size = vocab_size
        self.mask_prob = mask_prob
        self.special_ids = {**DEFAULT_SPECIAL_IDS, **(special_ids or {})}
        self.first_ordinary_id = max(self.special_ids.values()) + 1
        if self.first_ordinary_id >= vocab_size:
            raise ValueError(f"vocabulary of {vocab_size} pieces has no ordinary token after the special ids {self.special_ids}")

    @property
    def causal(self) -> bool:
        return self.kind == "causal"

    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        input_ids = batch["input_ids"]
        doc_ids = batch.get("doc_ids")
        if doc_ids is None:
            doc_ids = doc_ids_from_padding(input_ids, self.special_ids["pad"])
        if self.causal:
            return {"input_ids": input_ids, "doc_ids": doc_ids, "labels": causal_labels(input_ids, doc_ids)}
        corrupted, labels = mask_tokens(
            input_ids.cpu(), doc_ids.cpu(), mask_prob=self.mask_prob, mask_id=self.special_ids["mask"],
            vocab_size=self.vocab_size, first_ordinary_id=self.first_ordinary_id,
            generator=generator if generator is not None else torch.Generator().manual_seed(0),
        )
        return {"input_ids": corrupted.to(input_ids.device), "doc_ids": doc_ids, "labels": labels.to(input_ids.device)}
