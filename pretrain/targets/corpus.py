"""The tokenized training split as documents of pieces, for the target trainer and the diagnostics.

Samples are split at eos (documents are concatenated with eos between them); pad and the other
control ids (bos, mask) are dropped, as they carry no context. <unk> and byte pieces stay: they are
real tokens the model has to predict.

The shards are read once: that pass counts the pieces, keeps a sample of documents for the
diagnostics, and writes the documents as piece strings, one per line, to a text file in gensim's
LineSentence format. gensim then trains from that file (`corpus_file`), which spreads over all cores
without the Python producer thread (and the repeated shard decoding) that `corpus_iterable` needs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm


def split_documents(samples: Iterable[np.ndarray], eos_id: int, drop_ids: Iterable[int]) -> Iterator[np.ndarray]:
    """Yield each non-empty document piece of each sample (int64 ids)."""
    drop = np.asarray(sorted(set(drop_ids) - {eos_id}), dtype=np.int64)
    for sample in samples:
        sample = np.asarray(sample, dtype=np.int64)
        cuts = np.nonzero(sample == eos_id)[0]
        for doc in np.split(sample, cuts):
            doc = doc[doc != eos_id]
            if len(drop):
                doc = doc[~np.isin(doc, drop)]
            if len(doc):
                yield doc


def piece_tokens(pieces: list[str]) -> list[str]:
    """A whitespace-free, unique token per piece (the corpus file is split on whitespace).

    Pieces are kept as they are ("▁the", "<0x0A>") unless they hold whitespace characters (possible
    with identity normalisation), which are escaped as \\uXXXX.
    """
    tokens, taken = [], set(pieces)
    for i, piece in enumerate(pieces):
        token = piece
        if not piece or any(c.isspace() for c in piece):
            token = "".join(f"\\u{ord(c):04x}" if c.isspace() else c for c in piece) or "<empty>"
            if token in taken:
                token = f"{token}#{i}"
            taken.add(token)
        tokens.append(token)
    return tokens


def write_piece_corpus(
    documents: Iterable[np.ndarray],
    path: str | Path | None,
    tokens: list[str],
    *,
    keep_tokens: int = 0,
    total_tokens: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Write one document per line (path None: only count); return the token count per id and the
    first documents up to keep_tokens tokens (a sample for the diagnostics)."""
    vocab_size = len(tokens)
    counts = np.zeros(vocab_size, dtype=np.int64)
    kept, kept_tokens = [], 0
    with open(path if path is not None else os.devnull, "w", encoding="utf-8") as out, tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="read shards", disable=not progress, mininterval=1.0) as bar:
        for doc in documents:
            if doc.max(initial=0) >= vocab_size or doc.min(initial=0) < 0:
                raise ValueError(
                    f"token ids in [{int(doc.min())}, {int(doc.max())}] fall outside the vocabulary of {vocab_size} pieces: "
                    "the shards do not match the tokenizer; rerun `pretrain prepare`"
                )
            counts += np.bincount(doc, minlength=vocab_size)
            if path is not None:
                out.write(" ".join([tokens[i] for i in doc.tolist()]))
                out.write("\n")
            if kept_tokens < keep_tokens:
                kept.append(doc)
                kept_tokens += len(doc)
            bar.update(len(doc))
        bar.total = bar.n  # the manifest's count includes pad/eos, which are not written
    return counts, kept
