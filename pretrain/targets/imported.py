"""Import word2vec / fastText vectors and align them to the SentencePiece vocabulary.

Pieces are matched in passes, each word vector going to at most one id (two ids with the same
vector could never be told apart by nearest-neighbour decoding):
  1. exact      a "▁" piece itself is in the file (vectors trained over pieces, "▁the")
  2. word       a word-initial piece without its "▁" marker ("▁the" -> "the")
  3. inner      a word-internal piece as a word ("ing"), if that word is still free
  4. lowercase  the lowercased form of 2/3 ("▁The" -> "the"), if still free
Uncovered pieces then go through the fill policy (fastText .bin files compose n-grams).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pretrain.targets.fill import PIECE, Composer, ngram_composer

MARKER = "\u2581"  # SentencePiece's word-boundary marker "▁"
FASTTEXT_BIN_MAGIC = 793712314  # first int32 of a Facebook fastText .bin model
MATCH_PASSES = ("exact", "word", "inner", "lowercase")


@dataclass
class ImportedVectors:
    vectors: np.ndarray  # [V, D]
    sources: list[Optional[str]]  # one of MATCH_PASSES, or None when uncovered
    composer: Optional[Composer]
    stats: dict


def load_keyed_vectors(path: str | Path, binary: bool):
    """gensim KeyedVectors from word2vec text/binary, or FastTextKeyedVectors from a fastText .bin."""
    from gensim.models import KeyedVectors
    from gensim.models.fasttext import load_facebook_vectors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"targets.import_path {path} not found (a word2vec/fastText .vec/.txt/.bin file)")
    with path.open("rb") as fh:
        head = fh.read(4)
    is_fasttext_bin = len(head) == 4 and int.from_bytes(head, "little", signed=True) == FASTTEXT_BIN_MAGIC
    try:
        if is_fasttext_bin:
            return load_facebook_vectors(str(path))
        return KeyedVectors.load_word2vec_format(str(path), binary=binary, unicode_errors="replace")
    except Exception as exc:  # gensim raises ValueError/EOFError/UnicodeError/... on a bad file
        hint = "set targets.import_binary=false for a text .vec/.txt file" if binary else "set targets.import_binary=true for a binary word2vec file"
        raise ValueError(f"cannot read vectors from {path} ({type(exc).__name__}: {exc}); is it word2vec/fastText format? {hint}") from None


def _candidates(piece: str) -> dict[str, Optional[str]]:
    """The word each match pass would look up for this piece (None: pass does not apply)."""
    initial = piece.startswith(MARKER) and len(piece) > 1
    bare = piece[1:] if initial else piece
    return {
        "exact": piece if piece.startswith(MARKER) else None,  # bare pieces wait for pass 3
        "word": bare if initial else None,
        "inner": None if initial or piece.startswith(MARKER) else piece,
        "lowercase": bare.lower() if bare.lower() != bare else None,
    }


def align_to_pieces(kv, pieces: Sequence[str], kinds: Sequence[str], dim: int, *, source: str = "vectors") -> ImportedVectors:
    """Map keyed vectors onto piece ids (only ordinary pieces; specials and bytes are left to the fill)."""
    if kv.vector_size != dim:
        raise ValueError(f"{source} holds {kv.vector_size}-dimensional vectors but targets.dim={dim}; set targets.dim={kv.vector_size}")
    vectors = np.zeros((len(pieces), dim), dtype=np.float32)
    sources: list[Optional[str]] = [None] * len(pieces)
    used: set[str] = set()
    candidates = [_candidates(p) if k == PIECE else {} for p, k in zip(pieces, kinds)]
    for match in MATCH_PASSES:
        for i, cands in enumerate(candidates):
            word = cands.get(match)
            if sources[i] is None and word is not None and word not in used and word in kv.key_to_index:
                vectors[i], sources[i] = kv.get_vector(word), match
                used.add(word)
    composer = None
    if hasattr(kv, "vectors_ngrams"):  # fastText: compose the rest from n-grams of the bare piece
        compose_word = ngram_composer(kv, only_trained_buckets=False)
        composer = lambda piece: compose_word(piece[1:] if piece.startswith(MARKER) and len(piece) > 1 else piece)  # noqa: E731
    stats = {"file_words": len(kv.key_to_index), "file_dim": int(kv.vector_size), "words_used": len(used)}
    return ImportedVectors(vectors, sources, composer, stats)


def import_vectors(path: str | Path, binary: bool, pieces: Sequence[str], kinds: Sequence[str], dim: int) -> ImportedVectors:
    return align_to_pieces(load_keyed_vectors(path, binary), pieces, kinds, dim, source=str(path))


def coverage(sources: Sequence[Optional[str]], counts: np.ndarray | None = None) -> dict:
    """Fraction of ids (and of corpus tokens, when counts are given) covered by the file itself."""
    covered = np.array([s in MATCH_PASSES for s in sources])
    out = {"ids_covered": int(covered.sum()), "ids_total": len(sources), "id_coverage": float(covered.mean()) if len(sources) else 0.0}
    if counts is not None and counts.sum() > 0:
        out["token_coverage"] = float(counts[covered].sum() / counts.sum())
    return out
