"""Give every vocabulary id a vector, also the ids the trainer or the imported file did not cover.

Policy, in order, for an id without a vector (or with a zero / non-finite one):
- special tokens (control symbols, <unk>) and byte-fallback pieces (<0x41>): a fixed random unit vector.
  Their spelling says nothing about their meaning, and byte pieces share n-grams ("<0x"), so composing
  them would give near-duplicates that decoding could not tell apart.
- ordinary pieces: the mean of their character n-gram vectors (fastText), when at least one of their
  n-grams was seen in training; otherwise a fixed random unit vector.
The random vectors come from one seeded table (random_unit_table), so a rebuild gives the same rows.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from pretrain.targets.table import random_unit_table

SPECIAL, BYTE, PIECE = "special", "byte", "piece"
RANDOM, NGRAM = "random", "ngram"
# A composer returns a vector for a piece from its character n-grams, or None when it has none.
Composer = Callable[[str], Optional[np.ndarray]]


def piece_kinds(sp) -> list[str]:
    """special / byte / piece for every id of a SentencePieceProcessor."""
    kinds = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            kinds.append(SPECIAL)
        elif sp.is_byte(i):
            kinds.append(BYTE)
        else:
            kinds.append(PIECE)
    return kinds


@dataclass
class FilledTable:
    table: torch.Tensor  # [V, D] float32, not yet normalised
    sources: list[str]  # how each id got its vector: trained / exact / word / ... / ngram / random
    kinds: list[str]
    counts: dict = field(default_factory=dict)


def fill_missing(
    vectors: np.ndarray,
    sources: Sequence[Optional[str]],
    pieces: Sequence[str],
    kinds: Sequence[str],
    *,
    seed: int,
    composer: Composer | None = None,
) -> FilledTable:
    """vectors [V, D] with sources[i] None where id i has no vector; fills those rows by the policy above."""
    vectors = np.array(vectors, dtype=np.float32, copy=True)
    vocab_size, dim = vectors.shape
    if not (len(sources) == len(pieces) == len(kinds) == vocab_size):
        raise ValueError(f"fill_missing: {vocab_size} vectors but {len(sources)} sources, {len(pieces)} pieces, {len(kinds)} kinds")
    sources = list(sources)
    norms = np.linalg.norm(vectors, axis=1)
    for i in np.nonzero(~np.isfinite(norms) | (norms < 1e-8))[0]:
        sources[i] = None  # a degenerate vector from the source counts as missing
    fallback = random_unit_table(vocab_size, dim, seed).numpy()
    for i, src in enumerate(sources):
        if src is not None:
            continue
        composed = composer(pieces[i]) if (composer is not None and kinds[i] == PIECE) else None
        if composed is not None and np.isfinite(composed).all() and np.linalg.norm(composed) > 1e-8:
            vectors[i], sources[i] = composed, NGRAM
        else:
            vectors[i], sources[i] = fallback[i], RANDOM
    counts = {
        "by_source": dict(Counter(sources)),
        "by_kind": {kind: dict(Counter(s for s, k in zip(sources, kinds) if k == kind)) for kind in (SPECIAL, BYTE, PIECE)},
    }
    return FilledTable(torch.from_numpy(vectors), sources, list(kinds), counts)


def ngram_composer(wv, *, only_trained_buckets: bool = True) -> Composer:
    """Compose a piece from a gensim FastTextKeyedVectors' n-gram buckets.

    only_trained_buckets: use only buckets that some vocabulary word's n-grams hash to (the others were
    never updated in training, so they are random noise); a piece with none of them gets no vector.
    """
    from gensim.models.fasttext import ft_ngram_hashes

    def hashes(word: str) -> list[int]:
        return ft_ngram_hashes(word, wv.min_n, wv.max_n, wv.bucket)

    trained = None
    if only_trained_buckets:
        trained = set()
        for word in wv.index_to_key:
            trained.update(hashes(word))

    def compose(piece: str) -> Optional[np.ndarray]:
        buckets = [h for h in hashes(piece) if trained is None or h in trained]
        if not buckets:
            return None
        return wv.vectors_ngrams[buckets].mean(axis=0)

    return compose
