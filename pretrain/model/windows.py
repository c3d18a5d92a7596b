"""Inputs longer than the model's positions: sliding windows, pooled back to one vector per text.

A text of n pieces becomes the windows [s, s + window) for s = 0, stride, 2·stride, ..., the last one
moved back to end at n (so every piece is read, none twice more than the overlap needs). Each window
is encoded alone and mean-pooled over its real tokens; a text's vector is the mean of its windows'.
A text that fits in one window is read exactly as before: one window, the plain mean over its tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def default_stride(window: int) -> int:
    """Windows overlap by half unless told otherwise."""
    return max(1, window // 2)


def document_ids(sp, texts: list[str]) -> list[list[int]]:
    """Token ids per text, each ended by eos (as documents are in pretraining), not cut: long texts
    are read in windows."""
    eos = sp.eos_id()
    return [ids + [eos] for ids in sp.encode(list(texts))]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows covering `length` pieces (one window if it fits)."""
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got window={window}, stride={stride}")
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)  # the tail: a last window ending at the last piece
    return starts


def split_windows(ids: list[int], window: int, stride: int, max_windows: int = 0) -> list[list[int]]:
    """The windows of one token sequence; max_windows > 0 keeps that many, evenly spread over the text."""
    starts = window_starts(len(ids), window, stride)
    if 0 < max_windows < len(starts):
        # evenly spaced picks, always the first and (if more than one) the last window
        picks = torch.linspace(0, len(starts) - 1, max_windows).round().long().tolist()
        starts = [starts[i] for i in picks]
    return [ids[s : s + window] for s in starts]


@dataclass
class WindowBatch:
    """The windows of several texts, right-padded: row i belongs to text owner[i]."""

    input_ids: torch.Tensor       # [W, window] long
    attention_mask: torch.Tensor  # [W, window] 1 = real token
    owner: torch.Tensor           # [W] index of the text each window comes from
    num_texts: int


def window_batch(sequences: list[list[int]], window: int, stride: int, pad_id: int, max_windows: int = 0) -> WindowBatch:
    rows, owner = [], []
    for text_index, ids in enumerate(sequences):
        if not ids:
            raise ValueError(f"text {text_index} has no tokens; every text needs at least one (e.g. its eos)")
        for piece in split_windows(ids, window, stride, max_windows):
            rows.append(piece)
            owner.append(text_index)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return WindowBatch(input_ids, attention_mask, torch.tensor(owner), len(sequences))


def mean_over_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L, H] -> [B, H]: the mean over real tokens (attention_mask 1)."""
    keep = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1.0)


def mean_over_windows(window_vectors: torch.Tensor, owner: torch.Tensor, num_texts: int) -> torch.Tensor:
    """[W, H] window vectors -> [num_texts, H]: each text's mean over its windows."""
    sums = window_vectors.new_zeros(num_texts, window_vectors.shape[1]).index_add(0, owner.to(window_vectors.device), window_vectors)
    counts = torch.bincount(owner, minlength=num_texts).clamp(min=1).to(sums)
    return sums / counts.unsqueeze(1)
