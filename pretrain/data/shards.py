"""Stage 4 of `pretrain prepare`: write packed sequences as WebDataset tar shards.

The tars are byte-identical for identical input: webdataset's TarWriter stamps every member with
the current time unless ``mtime`` is given, so it is pinned here together with owner and mode
(uid/gid are 0 in TarInfo by default). Each shard is written to a ``.tmp`` file and renamed when
complete, so a crash never leaves a half-written shard under its final name.

Speed: building each member's header through tarfile (TarInfo copy, pax check, field packing) was
three quarters of prepare's time per process, SentencePiece a quarter. Every member of our shards
has the same header but for its name (sizes are fixed by seq_len), so ``SampleTarWriter`` asks
tarfile for one header per (name length, size) and patches the name and checksum; its output is
byte for byte webdataset's TarWriter's (a test compares them).
"""
from __future__ import annotations

import functools
import io
import tarfile
from pathlib import Path

import numpy as np

from pretrain.data.tokenizer import file_sha256

# Shards of each part of the corpus (see prepare.py), numbered within the part.
SHARD_PATTERN = "shard-{part:05d}-{index:05d}.tar"
KEY_DIGITS = 10
# Fixed tar header fields (reproducible archives).
TAR_MTIME = 0
TAR_OWNER = "pretrain"
TAR_MODE = 0o444


@functools.lru_cache(maxsize=None)
def _npy_header(length: int) -> bytes:
    """The .npy header ``np.save`` writes for an int32 vector of ``length``."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(length, dtype=np.int32))
    return buffer.getvalue()[: -4 * length]


def npy_bytes(vector: np.ndarray) -> bytes:
    """``np.save`` output of an int32 vector (np.save per sample was a quarter of the write time)."""
    vector = np.ascontiguousarray(vector, dtype=np.int32)
    return _npy_header(len(vector)) + vector.tobytes()


def npy_array(payload: bytes, length: int) -> np.ndarray:
    """Inverse of ``npy_bytes``; other .npy content goes through ``np.load`` (its header parsing
    was 40% of the time to read a shard)."""
    header = _npy_header(length)
    if payload.startswith(header) and len(payload) == len(header) + 4 * length:
        return np.frombuffer(payload, dtype=np.int32, offset=len(header)).copy()
    return np.load(io.BytesIO(payload), allow_pickle=False)


class SampleTarWriter:
    """``wds.TarWriter(stream, user=group=TAR_OWNER, mode=TAR_MODE, mtime=TAR_MTIME, encoder=False)``
    for samples of bytes values with ASCII keys, at a fraction of its cost per member."""

    def __init__(self, stream):
        self.stream = stream
        self.offset = 0

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        for field in sorted(k for k in sample if k != "__key__"):  # webdataset's member order
            payload = sample[field]
            header = _member_header(f"{key}.{field}", len(payload))
            padding = -len(payload) % tarfile.BLOCKSIZE
            self.stream.write(header + payload + tarfile.NUL * padding)
            self.offset += len(header) + len(payload) + padding

    def close(self) -> None:
        # tarfile's end of archive: two zero blocks, then zeros up to a whole record
        self.stream.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        self.offset += 2 * tarfile.BLOCKSIZE
        self.stream.write(tarfile.NUL * (-self.offset % tarfile.RECORDSIZE))


@functools.lru_cache(maxsize=64)
def _header_template(name_length: int, size: int) -> bytes:
    info = tarfile.TarInfo("x" * name_length)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, TAR_MTIME, TAR_MODE, TAR_OWNER, TAR_OWNER
    header = info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    if len(header) != tarfile.BLOCKSIZE:
        raise ValueError(f"a {name_length}-character member name needs a pax header; shard member names are short")
    return header


def _member_header(name: str, size: int) -> bytes:
    """tarfile's header for a member ``name`` of ``size`` bytes (TAR_* owner, mode and mtime)."""
    header = bytearray(_header_template(len(name), size))
    header[: len(name)] = name.encode("ascii")
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


def sample_key(part: int, index: int) -> str:
    """`__key__` of a sample: its part and its zero-padded index within that part's split."""
    return f"{part:05d}-{index:0{KEY_DIGITS}d}"


class ShardWriter:
    """Write (input_ids, doc_ids) sequences of one split of one corpus part into shards of ``samples_per_shard``.

    ``shards`` lists, per finished shard, the entry that goes into the manifest: name (relative to
    the data dir), samples, tokens (non-padding positions), bytes and sha256.
    """

    def __init__(self, data_dir: str | Path, split: str, samples_per_shard: int, part: int = 0):
        self.data_dir = Path(data_dir)
        self.split = split
        self.part = part
        self.samples_per_shard = samples_per_shard
        (self.data_dir / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self.samples = 0
        self.tokens = 0
        self._writer: SampleTarWriter | None = None
        self._file = None
        self._shard_samples = 0
        self._shard_tokens = 0

    def write(self, input_ids: np.ndarray, doc_ids: np.ndarray) -> None:
        if self._writer is None:
            self._open()
        self._writer.write({"__key__": sample_key(self.part, self.samples), "input_ids.npy": npy_bytes(input_ids), "doc_ids.npy": npy_bytes(doc_ids)})
        tokens = int((doc_ids >= 0).sum())
        self.samples += 1
        self.tokens += tokens
        self._shard_samples += 1
        self._shard_tokens += tokens
        if self._shard_samples == self.samples_per_shard:
            self._close()

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._close()
        return self.shards

    def _shard_path(self) -> Path:
        return self.data_dir / self.split / SHARD_PATTERN.format(part=self.part, index=len(self.shards))

    def _open(self) -> None:
        self._file = open(self._shard_path().with_suffix(".tar.tmp"), "wb")
        self._writer = SampleTarWriter(self._file)
        self._shard_samples = self._shard_tokens = 0

    def _close(self) -> None:
        final = self._shard_path()
        self._writer.close()
        self._file.close()
        final.with_suffix(".tar.tmp").replace(final)
        self.shards.append(
            {
                "name": f"{self.split}/{final.name}",
                "samples": self._shard_samples,
                "tokens": self._shard_tokens,
                "bytes": final.stat().st_size,
                "sha256": file_sha256(final),
            }
        )
        self._writer = self._file = None


def remove_old_shards(data_dir: str | Path, split: str, part: int | None = None, keep: frozenset = frozenset()) -> int:
    """Delete shards a previous `prepare` left in ``<data_dir>/<split>`` (of one ``part``, or all but
    the names in ``keep``): they would not match the new manifest."""
    removed = 0
    pattern = "shard-*.tar*" if part is None else f"shard-{part:05d}-*.tar*"
    for path in sorted((Path(data_dir) / split).glob(pattern)):
        if f"{split}/{path.name}" in keep:
            continue
        path.unlink()
        removed += 1
    return removed
