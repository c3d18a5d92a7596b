"""Sequence classification data and model: labelled CSV/JSONL files -> padded token batches -> logits.

Reading is strict: a missing file, an empty file, a missing column, an unparsable line or a validation
label never seen in training is an error that names the file, the line and the fix. Nothing is dropped
silently (blank lines are not rows and are ignored).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


@dataclass
class LabelledTexts:
    """Rows of one file, in file order."""

    path: Path
    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def _fix_hint(text_field: str, label_field: str) -> str:
    return (
        f"each row needs a text column '{text_field}' and a label column '{label_field}' "
        "(rename them with finetune.text_field=... finetune.label_field=...)"
    )


def _cell(value, field: str, where: str, hint: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: empty or missing '{field}'; {hint}")
    # int labels (0/1/2) are common in JSONL; anything structured is a mistake.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: '{field}' must be a string or an integer, got {type(value).__name__} {value!r}")
    return str(value)


def _rows_jsonl(path: Path):
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {line_no}: not valid JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {line_no}: expected a JSON object per line, got {type(row).__name__}")
            yield line_no, row


def _rows_csv(path: Path, delimiter: str):
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            return
        for row in reader:
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue
            # line_num is the reader's position after the row: right for single-line rows
            yield reader.line_num, row


def read_labelled(path: str | Path, text_field: str = "text", label_field: str = "label", *, key: str = "") -> LabelledTexts:
    """Read a CSV/TSV (header row) or JSONL file of (text, label) rows; `key` names the config key in errors."""
    path = Path(path)
    hint = _fix_hint(text_field, label_field)
    if not path.is_file():
        where = f" (set {key}=PATH)" if key else ""
        raise FileNotFoundError(f"labelled data file {path} not found{where}; expected CSV or JSONL: {hint}")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown format '{path.suffix}'; use one of {', '.join(sorted(FORMATS))}")
    rows = _rows_jsonl(path) if kind == "jsonl" else _rows_csv(path, "\t" if kind == "tsv" else ",")
    texts, labels = [], []
    try:
        for line_no, row in rows:
            missing = [k for k in (text_field, label_field) if k not in row]
            if missing:
                raise ValueError(
                    f"{path} line {line_no}: no column {', '.join(repr(m) for m in missing)} "
                    f"(found {', '.join(repr(k) for k in row if k is not None)}); {hint}"
                )
            where = f"{path} line {line_no}"
            texts.append(_cell(row[text_field], text_field, where, hint))
            labels.append(_cell(row[label_field], label_field, where, hint))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8") from None
    if not texts:
        raise ValueError(f"{path} holds no rows; {hint}")
    return LabelledTexts(path, texts, labels)


def balanced_head(data: LabelledTexts, limit: int) -> LabelledTexts:
    """At most `limit` rows: the first limit // labels of each label, in file order (0 = all rows)."""
    if limit <= 0 or limit >= len(data.texts):
        return data
    per_label = max(1, limit // len(set(data.labels)))
    taken: dict[str, int] = {}
    keep = []
    for i, label in enumerate(data.labels):
        if taken.get(label, 0) < per_label:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return LabelledTexts(data.path, [data.texts[i] for i in keep], [data.labels[i] for i in keep])


def label_vocabulary(train: LabelledTexts, *others: LabelledTexts) -> list[str]:
    """Sorted training labels; a label in another split that training never saw is an error."""
    labels = sorted(set(train.labels))
    if len(labels) < 2:
        raise ValueError(f"{train.path}: only one label ({labels[0]!r}); classification needs at least two")
    known = set(labels)
    for split in others:
        unknown = sorted(set(split.labels) - known)
        if unknown:
            first = split.labels.index(unknown[0])
            raise ValueError(
                f"{split.path}: label(s) {unknown} never appear in the training file {train.path} "
                f"(first at row {first + 1}); training labels are {labels}"
            )
    return labels


def encode_texts(sp, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids per text, each ended by eos (as documents are in pretraining) and cut to max_len."""
    eos = sp.eos_id()
    return [ids[: max_len - 1] + [eos] for ids in sp.encode(texts)]


def pad_batch(sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad to the longest sequence of the batch (padding is masked out by the pooling)."""
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


class SequenceClassifier(nn.Module):
    """Pretrained encoder -> pooled hidden state -> linear classifier."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int, pooling: str = "mean", pad_id: int = 0, dropout: float = 0.1):
        super().__init__()
        if pooling not in ("mean", "first"):
            raise ValueError(f"pooling must be 'mean' or 'first', got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.pad_id = pad_id
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_labels)

    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        if self.pooling == "first":
            return hidden[:, 0]
        keep = (input_ids != self.pad_id).unsqueeze(-1).to(hidden.dtype)
        return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder.encode(input_ids)
        return self.head(self.dropout(self.pool(hidden, input_ids)))
