"""The target table on disk: a unit-normalised V x D float32 tensor in safetensors, with metadata.

The metadata ties the table to the tokenizer and the dataset it was built for, so a table built for
another vocabulary is refused with the fix instead of silently decoding to the wrong pieces. It also
holds the sha256 of the table's values (``content_sha256``), checked on every load (training, eval,
export): swapped rows or flipped sign bits keep every row unit-norm, and only the checksum sees them.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

log = logging.getLogger(__name__)

TENSOR_NAME = "embeddings"
CONTENT_SHA256 = "content_sha256"  # metadata key: sha256 of the float32 values, row-major
REQUIRED_META = ("tokenizer_sha256", "vocab_size", "dim", "method", "manifest_sha256")
# Row norms further than this from 1 mean the file was not written by save_target_table.
NORM_TOLERANCE = 1e-3
_FIX = "rebuild it with `pretrain targets` for this dataset (same config), or point targets.path at the right table"


def normalize_rows(table: torch.Tensor) -> torch.Tensor:
    """Unit rows in float32; a zero or non-finite row is an error (the fill policy must have replaced it)."""
    table = table.detach().to(torch.float32)
    norms = table.norm(dim=1, keepdim=True)
    bad = ~torch.isfinite(norms).squeeze(1) | (norms.squeeze(1) < 1e-12)
    if bad.any():
        ids = bad.nonzero().squeeze(1)[:10].tolist()
        raise ValueError(f"target table has {int(bad.sum())} zero or non-finite rows (first ids: {ids})")
    return table / norms


def random_unit_table(vocab_size: int, dim: int, seed: int) -> torch.Tensor:
    """A seeded table of random unit rows: the baseline method and the fallback for ids without a vector."""
    gen = torch.Generator().manual_seed(seed)
    return normalize_rows(torch.randn(vocab_size, dim, generator=gen))


def content_sha256(table: torch.Tensor) -> str:
    return hashlib.sha256(table.detach().to(torch.float32).contiguous().numpy()).hexdigest()


def save_target_table(path: str | Path, table: torch.Tensor, meta: dict) -> Path:
    """Normalise the rows and write them with string metadata (vocab_size and dim are filled in)."""
    path = Path(path)
    if table.ndim != 2:
        raise ValueError(f"target table must be 2-D [vocab, dim], got shape {tuple(table.shape)}")
    table = normalize_rows(table).contiguous()
    metadata = {str(k): str(v) for k, v in meta.items()}
    metadata["vocab_size"] = str(table.shape[0])
    metadata["dim"] = str(table.shape[1])
    metadata[CONTENT_SHA256] = content_sha256(table)
    missing = [k for k in REQUIRED_META if not metadata.get(k)]
    if missing:
        raise ValueError(f"target table metadata lacks {missing}; required: {list(REQUIRED_META)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({TENSOR_NAME: table}, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # safetensors creates the file owner-only; the table is shared like the shards
    tmp.replace(path)  # atomic: a reader never sees half a table
    return path


def read_table_meta(path: str | Path) -> dict:
    """The metadata alone (cheap: no tensor is read)."""
    return _open(Path(path))[1]


def load_target_table(
    path: str | Path, *, tokenizer_sha256: str | None = None, vocab_size: int | None = None
) -> tuple[torch.Tensor, dict]:
    """Load a table and check it belongs to this tokenizer / vocabulary; returns (Tensor[V, D], meta)."""
    path = Path(path)
    handle, meta = _open(path)
    table = handle.get_tensor(TENSOR_NAME)
    if table.ndim != 2 or table.dtype != torch.float32:
        raise ValueError(f"target table {path}: tensor '{TENSOR_NAME}' is {table.dtype} {tuple(table.shape)}, expected float32 [V, D]; {_FIX}")
    if str(table.shape[0]) != meta["vocab_size"] or str(table.shape[1]) != meta["dim"]:
        raise ValueError(
            f"target table {path}: shape {tuple(table.shape)} disagrees with its metadata "
            f"(vocab_size={meta['vocab_size']}, dim={meta['dim']}); the file is corrupt; {_FIX}"
        )
    if vocab_size is not None and table.shape[0] != vocab_size:
        raise ValueError(f"target table {path} has {table.shape[0]} rows but the tokenizer has {vocab_size} pieces; {_FIX}")
    if tokenizer_sha256 is not None and meta["tokenizer_sha256"] != tokenizer_sha256:
        raise ValueError(
            f"target table {path} was built for tokenizer sha256 {meta['tokenizer_sha256'][:12]}..., "
            f"but this dataset's tokenizer is {tokenizer_sha256[:12]}...; {_FIX}"
        )
    if CONTENT_SHA256 not in meta:
        log.warning("target table %s was written before tables carried a checksum: its values cannot be verified", path)
    elif content_sha256(table) != meta[CONTENT_SHA256]:
        raise ValueError(f"target table {path}: its values do not match the sha256 recorded in its metadata when it was "
                         f"written (rows swapped or bits changed since); {_FIX}")
    norms = table.norm(dim=1)
    if not torch.isfinite(norms).all() or (norms - 1).abs().max() > NORM_TOLERANCE:
        raise ValueError(f"target table {path} has rows that are not unit-norm or not finite; {_FIX}")
    return table, meta


def _open(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"target table {path} not found; build it with `pretrain targets` (or set targets.path)")
    try:
        handle = safe_open(str(path), framework="pt")
        meta = handle.metadata() or {}
        names = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"target table {path} is not a readable safetensors file ({exc}); {_FIX}") from None
    if TENSOR_NAME not in names:
        raise ValueError(f"target table {path} has no tensor '{TENSOR_NAME}' (has {names}); {_FIX}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"target table {path} lacks metadata {missing}; {_FIX}")
    return handle, meta
