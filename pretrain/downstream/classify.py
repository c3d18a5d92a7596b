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

from pretrain.model.windows import WindowBatch, default_stride, document_ids, mean_over_tokens, mean_over_windows, window_batch

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


def holdout_split(data: LabelledTexts, fraction: float, seed: int) -> tuple[LabelledTexts, LabelledTexts]:
    """(train, held-out) rows: `fraction` of each label's rows (at least one when it has two or
    more) drawn with a seeded shuffle, so every label is evaluated; file order kept within each."""
    gen = torch.Generator().manual_seed(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(data.labels):
        by_label.setdefault(label, []).append(i)
    held = set()
    for label in sorted(by_label):
        rows = by_label[label]
        take = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if len(rows) > 1 else 0
        held.update(rows[j] for j in torch.randperm(len(rows), generator=gen)[:take].tolist())
    keep = [i for i in range(len(data)) if i not in held]
    pick = lambda rows: LabelledTexts(data.path, [data.texts[i] for i in rows], [data.labels[i] for i in rows])  # noqa: E731
    return pick(keep), pick(sorted(held))


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


@dataclass
class WindowPolicy:
    """How a text longer than one window is read: windows of `window` tokens, `stride` apart, at
    most max_windows of them evenly spread (0 = all), each pooled, then averaged."""

    window: int
    stride: int
    max_windows: int

    @classmethod
    def from_config(cls, ft) -> "WindowPolicy":
        return cls(ft.max_len, ft.window_stride or default_stride(ft.max_len), ft.max_windows)

    def describe(self, pooling: str) -> str:
        cap = f"at most {self.max_windows} windows evenly spread over the text" if self.max_windows else "every window"
        return (f"texts longer than {self.window} tokens are read as sliding windows of {self.window} tokens, "
                f"{self.stride} apart ({cap}), each {pooling}-pooled, then averaged")

    def as_dict(self) -> dict:
        return {"window": self.window, "stride": self.stride, "max_windows": self.max_windows}


class SequenceClassifier(nn.Module):
    """Pretrained encoder -> pooled hidden state per window -> mean over a text's windows -> linear."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int, pooling: str = "mean", pad_id: int = 0,
                 dropout: float = 0.1, windows: WindowPolicy | None = None):
        super().__init__()
        if pooling not in ("mean", "first"):
            raise ValueError(f"pooling must be 'mean' or 'first', got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.pad_id = pad_id
        self.windows = windows or WindowPolicy(encoder.max_positions, default_stride(encoder.max_positions), 0)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_labels)

    def batch(self, sequences: list[list[int]]) -> WindowBatch:
        return window_batch(sequences, self.windows.window, self.windows.stride, self.pad_id, self.windows.max_windows)

    def features(self, batch: WindowBatch) -> torch.Tensor:
        """One pooled vector per text [N, H]."""
        device = self.head.weight.device
        mask = batch.attention_mask.to(device)
        hidden = self.encoder.encode(batch.input_ids.to(device), attention_mask=mask)
        per_window = hidden[:, 0] if self.pooling == "first" else mean_over_tokens(hidden, mask)
        return mean_over_windows(per_window, batch.owner, batch.num_texts)

    def forward(self, batch: WindowBatch) -> torch.Tensor:
        return self.head(self.dropout(self.features(batch)))
