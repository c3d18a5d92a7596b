"""Stage 3 of `pretrain prepare`: pack tokenised documents into fixed-length sequences.

Documents are concatenated, each followed by ``eos``, and cut every ``seq_len`` tokens; a document
may continue into the next sequence. ``doc_ids`` numbers the documents inside each sequence from 0
(the eos belongs to the document it ends) and is -1 on padding: attention masks and document-aware
objectives read it. Only the last sequence of a split is padded (with ``pad``).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


class SequencePacker:
    """Accumulate documents and hand out full [n, seq_len] blocks of (input_ids, doc_ids)."""

    def __init__(self, seq_len: int, eos_id: int, pad_id: int):
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.pad_id = pad_id
        # Tokens not yet emitted and the running (global) document number of each.
        self._tokens = np.empty(0, dtype=np.int32)
        self._docs = np.empty(0, dtype=np.int64)
        self._next_doc = 0

    def add(self, documents: list[list[int]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Append documents; yield every complete (input_ids, doc_ids) sequence."""
        if not documents:
            return
        lengths = np.fromiter((len(d) + 1 for d in documents), dtype=np.int64, count=len(documents))
        tokens = np.empty(int(lengths.sum()), dtype=np.int32)
        ends = np.cumsum(lengths)
        tokens[ends - 1] = self.eos_id
        starts = ends - lengths
        for doc, start in zip(documents, starts):
            tokens[start : start + len(doc)] = doc
        docs = np.repeat(np.arange(self._next_doc, self._next_doc + len(documents)), lengths)
        self._next_doc += len(documents)
        self._tokens = np.concatenate([self._tokens, tokens])
        self._docs = np.concatenate([self._docs, docs])
        n_full = len(self._tokens) // self.seq_len
        if n_full:
            cut = n_full * self.seq_len
            yield from self._emit(self._tokens[:cut], self._docs[:cut])
            self._tokens, self._docs = self._tokens[cut:], self._docs[cut:]

    def flush(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The last, padded sequence (nothing if no token is left)."""
        if len(self._tokens):
            pad = self.seq_len - len(self._tokens)
            tokens = np.concatenate([self._tokens, np.full(pad, self.pad_id, dtype=np.int32)])
            docs = np.concatenate([self._docs - self._docs[0], np.full(pad, -1, dtype=np.int64)])
            yield tokens, docs.astype(np.int32)
            self._tokens = np.empty(0, dtype=np.int32)
            self._docs = np.empty(0, dtype=np.int64)

    def _emit(self, tokens: np.ndarray, docs: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        tokens = tokens.reshape(-1, self.seq_len)
        docs = docs.reshape(-1, self.seq_len)
        local_docs = (docs - docs[:, :1]).astype(np.int32)
        for row_tokens, row_docs in zip(tokens, local_docs):
            yield row_tokens.copy(), row_docs.copy()

