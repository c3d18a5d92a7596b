"""Stage 1 of `pretrain prepare`: read the raw corpus into a stream of documents.

Inputs (``data.corpus``): files, directories (every non-hidden file below, sorted) and globs
(``**`` allowed). Compression is told by content, whatever the name: gzip and zstd magic bytes.
The format is told by the name (without ``.gz``/``.zst``):
- ``.jsonl``, ``.ndjson``, ``.json``: one JSON object per line, the document is ``record[data.text_field]``
  (other fields ignored);
- ``.parquet``: the column ``data.text_field``, one document per row, read one row group at a time
  with pyarrow (never the whole file);
- anything else: plain text.

What a document is in plain text (``data.doc_separator``):
- ``line``: every non-empty line;
- ``blank_line``: a paragraph, i.e. consecutive non-blank lines joined with ``\\n`` and separated by
  one or more blank lines (hard-wrapped prose: books, markdown, reStructuredText);
- ``auto`` (default), chosen per file: ``blank_line`` for ``.md``/``.rst``/``.tex``/``.adoc`` files
  and for text whose first 64 KiB look hard-wrapped (blank lines between paragraphs of several
  short lines), else ``line`` (one record per line, e.g. the demo corpus). The choice of each file
  is logged and counted in the manifest (``blank_line_files``).

Limits and bad input. A line, record or document over ``data.max_record_bytes`` is split into
pieces of at most that size (``data.oversize: split``) or skipped (``skip``); a JSONL line over the
limit is always skipped (it cannot be parsed without holding it); both counted and warned about,
naming the file. Lines are read with that limit, so memory stays bounded. A file that is not text
(binary: NUL bytes, mostly invalid UTF-8, ELF/zip/PDF/PNG magic) is refused with its name. Invalid
UTF-8 follows ``data.utf8_errors`` (``replace`` with U+FFFD, or ``skip`` the line), unreadable
JSONL records and null Parquet values are skipped; each case is counted in ``CorpusStats`` (written
to the manifest) and logged. A file that cannot be read at all (truncated gzip/zstd, no record with
the text field) is an error naming the file.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

from pretrain.config import REPO_ROOT
from pretrain.data.tokenizer import split_long_line

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"
# Magic numbers of common binary files that end up in a corpus directory by mistake.
BINARY_MAGICS = {b"\x7fELF": "an ELF executable", b"PK\x03\x04": "a zip archive", b"%PDF": "a PDF", b"\x89PNG": "a PNG image", PARQUET_MAGIC: "a Parquet file not named .parquet"}
# Bytes looked at to tell text from binary, and the share of them that may be control or invalid bytes.
SNIFF_BYTES = 8192
MAX_NON_TEXT_SHARE = 0.1
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd")
# Formats whose documents are paragraphs: with doc_separator=auto they are read as blank_line.
PARAGRAPH_SUFFIXES = (".md", ".markdown", ".rst", ".tex", ".adoc")
# doc_separator=auto looks at this much text: hard-wrapped when most lines are short and there are
# blank lines between paragraphs of several lines.
LAYOUT_SNIFF_BYTES = 1 << 16
WRAPPED_LINE_CHARS = 100
MIN_LINES_PER_PARAGRAPH = 2.0
# Warn about the first few bad lines of each kind, then only count them.
MAX_WARNINGS = 5


@dataclass
class CorpusStats:
    """What reading the corpus did; goes into manifest.json under "corpus"."""

    files: list[str] = field(default_factory=list)
    text_bytes: int = 0  # uncompressed bytes read
    documents: int = 0
    utf8_replaced_lines: int = 0
    utf8_skipped_lines: int = 0
    jsonl_skipped_records: int = 0
    parquet_skipped_rows: int = 0  # null or non-string values of the text column
    oversize_split: int = 0  # lines/records/documents over data.max_record_bytes, cut into pieces
    oversize_skipped: int = 0  # ... or skipped
    blank_line_files: int = 0  # plain-text files read one paragraph per document

    def as_dict(self) -> dict:
        return asdict(self)

    def add(self, other: "CorpusStats") -> None:
        """Add the counts of ``other`` (the stats of one more file) to these."""
        for f in fields(self):
            if f.name != "files":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def resolve_corpus_files(entries: list[str]) -> list[Path]:
    """Expand files, directories and globs into a sorted, de-duplicated list of files.

    A relative entry that does not exist under the working directory is looked up under the
    repository root, so the embedded demo corpus (``data/corpus``) is found from anywhere.
    """
    if not entries:
        raise ValueError("data.corpus is empty: list text/JSONL/Parquet files, directories or globs, e.g. data.corpus=[data/corpus]")
    files: list[Path] = []
    for entry in entries:
        matches = _expand_entry(entry)
        if not matches and not Path(entry).is_absolute():
            matches = _expand_entry(str(REPO_ROOT / entry))
        if not matches:
            # say only where it was really looked for: an absolute entry is not searched anywhere else
            where = "an absolute path" if Path(entry).is_absolute() else f"looked in {Path.cwd()} and {REPO_ROOT}"
            raise FileNotFoundError(f"corpus entry {entry!r} matches no file ({where}): fix data.corpus (files, directories or globs)")
        files.extend(matches)
    seen: set[Path] = set()
    unique = []
    for path in files:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def _expand_entry(entry: str) -> list[Path]:
    if any(ch in entry for ch in "*?["):
        return sorted(p for p in map(Path, glob.glob(entry, recursive=True)) if p.is_file())
    path = Path(entry)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return [path] if path.is_file() else []


def _base_name(path: Path) -> str:
    """The file name without a compression suffix: what tells the format."""
    name = path.name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_jsonl(path: Path) -> bool:
    return _base_name(path).endswith(JSONL_SUFFIXES)


def is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(PARQUET_SUFFIXES)


def open_decompressed(path: Path):
    """A binary stream of the file's content, gunzipped or un-zstd'ed when its magic bytes say so."""
    with open(path, "rb") as probe:
        magic = probe.read(4)
    if magic.startswith(GZIP_MAGIC):
        return gzip.open(path, "rb")
    if magic == ZSTD_MAGIC:
        return io.BufferedReader(_ZstdFrames(open(path, "rb")), buffer_size=1 << 16)
    return open(path, "rb")


class _ZstdFrames(io.RawIOBase):
    """Decompressed bytes of a file of one or more zstd frames; a truncated frame raises OSError
    (zstandard's stream_reader ends quietly there, which would drop the end of a cut file unseen)."""

    def __init__(self, raw):
        import zstandard  # the `data` extra

        self._zstd = zstandard
        self._raw = raw
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            compressed = self._raw.read(1 << 16)
            if not compressed:
                if self._in_frame:
                    raise OSError("the zstd stream ends inside a frame (truncated file)")
                return 0
            self._pending = self._decompress(compressed)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _decompress(self, compressed: bytes) -> bytes:
        try:
            out = self._frame.decompress(compressed)
            self._in_frame = True
            while self._frame.eof:  # a frame ended: the rest belongs to the next one
                rest = self._frame.unused_data
                self._frame = self._zstd.ZstdDecompressor().decompressobj()
                self._in_frame = bool(rest)
                if not rest:
                    break
                out += self._frame.decompress(rest)
            return out
        except self._zstd.ZstdError as exc:
            raise OSError(f"not a valid zstd stream ({exc})") from None

    def close(self) -> None:
        self._raw.close()
        super().close()


def non_text_reason(head: bytes) -> str | None:
    """Why the first bytes of a (decompressed) file are not text, or None when they look like text."""
    for magic, kind in BINARY_MAGICS.items():
        if head.startswith(magic):
            return kind
    if b"\x00" in head:
        return "it holds NUL bytes"
    text = head.decode("utf-8", errors="replace")
    if len(head) == SNIFF_BYTES:
        text = text[:-1]  # the cut may split the last character
    bad = sum(1 for ch in text if ch == "\ufffd" or (ch < " " and ch not in "\t\n\r\f\v"))
    if text and bad / len(text) > MAX_NON_TEXT_SHARE:
        return f"{100 * bad / len(text):.0f}% of its first {len(head)} bytes are invalid UTF-8 or control characters"
    return None


def looks_hard_wrapped(head: str) -> bool:
    """Prose wrapped at a fixed width: blank lines between paragraphs of several short lines."""
    lines = head.split("\n")[:-1] or head.split("\n")  # the last line may be cut
    filled = [line for line in lines if line.strip()]
    paragraphs = sum(1 for before, line in zip([""] + lines, lines) if line.strip() and not before.strip())
    if len(filled) < 2 * MIN_LINES_PER_PARAGRAPH or paragraphs < 2:
        return False
    short = sum(1 for line in filled if len(line) <= WRAPPED_LINE_CHARS)
    return short >= 0.9 * len(filled) and len(filled) / paragraphs >= MIN_LINES_PER_PARAGRAPH


class CorpusReader:
    """Iterate over the documents of a corpus, counting what it reads (``self.stats``).

    Each iteration re-reads the files from the start, so `prepare` can make several passes
    (size, tokenizer sample, tokenisation) without holding the corpus in memory.
    ``file_documents(path)`` reads one file (the unit parallel prepare distributes).
    """

    def __init__(
        self,
        entries: list[str],
        *,
        text_field: str = "text",
        doc_separator: str = "auto",
        utf8_errors: str = "replace",
        max_record_bytes: int = 16_000_000,
        oversize: str = "split",
    ):
        if utf8_errors not in ("replace", "skip"):
            raise ValueError(f"data.utf8_errors must be 'replace' or 'skip', got {utf8_errors!r}")
        if doc_separator not in ("auto", "line", "blank_line"):
            raise ValueError(f"data.doc_separator must be 'auto', 'line' or 'blank_line', got {doc_separator!r}")
        if oversize not in ("split", "skip"):
            raise ValueError(f"data.oversize must be 'split' or 'skip', got {oversize!r}")
        if max_record_bytes < 4:
            raise ValueError(f"data.max_record_bytes must be at least 4, got {max_record_bytes}")
        self.files = resolve_corpus_files(entries)
        self.text_field = text_field
        self.doc_separator = doc_separator
        self.utf8_errors = utf8_errors
        self.max_record_bytes = max_record_bytes
        self.oversize = oversize
        self.stats = CorpusStats(files=[str(p) for p in self.files])

    def __iter__(self) -> Iterator[str]:
        self.stats = CorpusStats(files=[str(p) for p in self.files])
        for path in self.files:
            yield from self.file_documents(path)

    # Per file ----------------------------------------------------------------------------------
    def file_documents(self, path: Path, start: int = 0, end: int | None = None) -> Iterator[str]:
        """The documents of one file, or of the lines that begin in its bytes [start, end) (only for
        a file ``splittable`` says can be read in ranges); counts go into ``self.stats``."""
        path = Path(path)
        if is_parquet(path):
            yield from self._parquet_documents(path)
            return
        try:
            head = self._text_head(path)
            paragraphs = not is_jsonl(path) and self._separator_of(path, head) == "blank_line"
            with open_decompressed(path) as stream:
                after_blank = True
                if start:
                    stream.seek(start - 1)
                    start += self._skip_line(stream) - 1  # the line that straddles start belongs to the range before
                    after_blank = paragraphs and self._line_before_is_blank(path, start)
                if paragraphs:
                    # a paragraph that starts in the range is read to its end, past the range's end
                    lines = self._decoded_lines(stream, path, parse_whole=False, start=start, bytes_until=end)
                    self.stats.blank_line_files += start == 0
                    yield from self._paragraph_documents(lines, path, end, after_blank)
                    return
                lines = self._decoded_lines(stream, path, parse_whole=is_jsonl(path), start=start, end=end)
                if is_jsonl(path):
                    yield from self._jsonl_documents(lines, path)
                else:
                    yield from self._line_documents(lines)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise ValueError(f"corpus file {path} is a corrupt or truncated gzip file ({exc}): re-create it or remove it from data.corpus") from None
        except OSError as exc:  # zstandard.ZstdError is one too
            raise ValueError(f"cannot read corpus file {path} (corrupt, truncated or unreadable: {exc}): re-create it or remove it from data.corpus") from None

    def splittable(self, path: Path) -> bool:
        """Whether ``file_documents`` may read the file in byte ranges: uncompressed text or JSONL."""
        path = Path(path)
        if is_parquet(path):
            return False
        with open(path, "rb") as probe:
            magic = probe.read(4)
        if magic.startswith(GZIP_MAGIC) or magic == ZSTD_MAGIC:
            return False
        self._text_head(path)  # refuses a binary file here already
        return True

    def _line_before_is_blank(self, path: Path, line_start: int) -> bool:
        """Whether the line that ends just before ``line_start`` (a line start) is blank."""
        window = min(line_start - 1, SNIFF_BYTES)  # a longer line is not blank
        with open(path, "rb") as f:
            f.seek(line_start - 1 - window)
            before = f.read(window)
        if b"\n" not in before and window < line_start - 1:
            return False
        return not before.rsplit(b"\n", 1)[-1].strip()

    def _text_head(self, path: Path) -> bytes:
        """The first (decompressed) bytes of a file; an error naming it if they are not text."""
        with open_decompressed(path) as stream:
            head = stream.read(max(SNIFF_BYTES, LAYOUT_SNIFF_BYTES))
        reason = non_text_reason(head[:SNIFF_BYTES])
        if reason:
            raise ValueError(f"corpus file {path} is not text ({reason}): remove it from data.corpus")
        return head

    def _skip_line(self, stream) -> int:
        """Read past the rest of the current line, ``max_record_bytes`` at a time; bytes read."""
        skipped = 0
        while (raw := stream.readline(self.max_record_bytes)):
            skipped += len(raw)
            if raw.endswith(b"\n"):
                break
        return skipped

    def _separator_of(self, path: Path, head: bytes) -> str:
        if self.doc_separator != "auto":
            return self.doc_separator
        if _base_name(path).endswith(PARAGRAPH_SUFFIXES) or looks_hard_wrapped(head.decode("utf-8", errors="replace")):
            log.info("%s: hard-wrapped text, one document per blank-line separated paragraph (data.doc_separator=auto)", path)
            return "blank_line"
        return "line"

    def _decoded_lines(self, stream, path: Path, parse_whole: bool, start: int = 0, end: int | None = None,
                       bytes_until: int | None = None) -> Iterator[tuple[str, str, int]]:
        """(where, text without the newline, byte offset where the line starts) of the lines that
        begin before ``end``; bad UTF-8 replaced or skipped per policy. ``where`` is the line number,
        or the byte offset in a range. Bytes count in the stats for lines that begin before
        ``bytes_until`` (default ``end``): each range counts the lines it starts.

        A line is read at most ``max_record_bytes`` at a time: a longer one is yielded in pieces
        (oversize=split, and never for JSONL: ``parse_whole``) or skipped."""
        limit = self.max_record_bytes
        bytes_until = end if bytes_until is None else bytes_until
        position, number = start, 0
        while (end is None or position < end) and (raw := stream.readline(limit)):
            number += 1
            where = f"byte {position}" if start else str(number)
            line_start = position
            counted = bytes_until is None or line_start < bytes_until
            position += len(raw)
            self.stats.text_bytes += len(raw) * counted
            if len(raw) < limit or raw.endswith(b"\n"):
                text = self._decode(raw, path, where)
                if text is not None:
                    yield where, text.rstrip("\r\n"), line_start
                continue
            if parse_whole or self.oversize == "skip":
                skipped = self._skip_line(stream)
                position += skipped
                self.stats.text_bytes += skipped * counted
                self._oversize(path, where, "skipped" + (" (a JSONL record must be parsed whole)" if parse_whole else ""))
                continue
            self._oversize(path, where, "split into pieces")
            carry = b""
            while raw:
                raw = carry + raw
                cut = _utf8_boundary(raw) if not raw.endswith(b"\n") else len(raw)
                raw, carry = raw[:cut], raw[cut:]
                text = self._decode(raw, path, where)
                if text is not None and text.rstrip("\r\n"):
                    yield where, text.rstrip("\r\n"), line_start
                if raw.endswith(b"\n"):
                    break
                raw = stream.readline(limit)
                position += len(raw)
                self.stats.text_bytes += len(raw) * counted
            if carry:
                yield where, carry.decode("utf-8", errors="replace"), line_start

    def _decode(self, raw: bytes, path: Path, where: str) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if self.utf8_errors == "skip":
                self.stats.utf8_skipped_lines += 1
                if self.stats.utf8_skipped_lines <= MAX_WARNINGS:
                    log.warning("%s:%s: invalid UTF-8 (%s); line skipped (data.utf8_errors=skip)", path, where, exc.reason)
                return None
            self.stats.utf8_replaced_lines += 1
            if self.stats.utf8_replaced_lines <= MAX_WARNINGS:
                log.warning("%s:%s: invalid UTF-8 (%s); bad bytes replaced by U+FFFD (data.utf8_errors=replace)", path, where, exc.reason)
            return raw.decode("utf-8", errors="replace")

    def _oversize(self, path: Path, where, action: str) -> None:
        counter = "oversize_split" if action.startswith("split") else "oversize_skipped"
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        if self.stats.oversize_split + self.stats.oversize_skipped <= MAX_WARNINGS:
            log.warning("%s:%s: longer than data.max_record_bytes=%d; %s (data.oversize=%s)", path, where, self.max_record_bytes, action, self.oversize)

    def _limited(self, text: str, path: Path, where) -> Iterator[str]:
        """A document within the size limit: as is, cut into pieces, or nothing (per data.oversize)."""
        if len(text) * 4 <= self.max_record_bytes or len(text.encode("utf-8")) <= self.max_record_bytes:
            self.stats.documents += 1
            yield text
            return
        if self.oversize == "skip":
            self._oversize(path, where, "skipped")
            return
        self._oversize(path, where, "split into pieces")
        for piece in split_long_line(text, self.max_record_bytes):
            if piece.strip():
                self.stats.documents += 1
                yield piece

    def _line_documents(self, lines: Iterator[tuple[str, str, int]]) -> Iterator[str]:
        for _, text, _ in lines:
            if text.strip():
                self.stats.documents += 1
                yield text

    def _paragraph_documents(self, lines: Iterator[tuple[str, str, int]], path: Path, end: int | None = None, after_blank: bool = True) -> Iterator[str]:
        """Paragraphs; in a byte range, those whose first line starts before ``end`` (``after_blank``:
        whether the line before the range's first line is blank, i.e. a paragraph may start there)."""
        paragraph: list[str] = []
        size = 0
        inside = not after_blank  # between a paragraph's first line and the blank line after it
        dropping = inside  # the lines of that paragraph are not ours: it began in the range before, or outgrew the limit (oversize=skip)
        for number, text, line_start in lines:
            if not text.strip():
                if paragraph:
                    yield from self._limited("\n".join(paragraph), path, number)
                paragraph, size, inside, dropping = [], 0, False, False
                continue
            if not inside and end is not None and line_start >= end:
                return  # this paragraph starts in the next range
            inside = True
            if dropping:
                continue
            paragraph.append(text)
            size += len(text.encode("utf-8")) + 1
            if size > self.max_record_bytes:  # outgrew the limit: its pieces go out now, or it is dropped
                dropping = self.oversize == "skip"
                yield from self._limited("\n".join(paragraph), path, number)
                paragraph, size = [], 0
        if paragraph:
            yield from self._limited("\n".join(paragraph), path, "end")

    def _jsonl_documents(self, lines: Iterator[tuple[str, str, int]], path: Path) -> Iterator[str]:
        records = documents = 0
        first_keys = None
        for number, text, _ in lines:
            if not text.strip():
                continue
            records += 1
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                self._skip_record(path, number, f"not valid JSON ({exc.msg})")
                continue
            if not isinstance(record, dict):
                self._skip_record(path, number, f"a JSON {type(record).__name__}, not an object")
                continue
            first_keys = first_keys or sorted(record)
            value = record.get(self.text_field)
            if not isinstance(value, str):
                why = "has no field" if value is None else f"has a non-string ({type(value).__name__})"
                self._skip_record(path, number, f"{why} {self.text_field!r}")
                continue
            if value.strip():
                documents += 1
                yield from self._limited(value, path, number)
        if records and not documents and first_keys is not None and self.text_field not in first_keys:
            raise ValueError(
                f"no record in {path} has the text field {self.text_field!r} (the first record's keys are "
                f"{first_keys}): set data.text_field to the field that holds the text"
            )

    def _parquet_documents(self, path: Path) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"corpus file {path} is not a readable Parquet file ({exc}): re-create it or remove it from data.corpus") from None
        schema = parquet.schema_arrow
        if self.text_field not in schema.names:
            raise ValueError(f"{path} has no column {self.text_field!r} (its columns are {schema.names}): set data.text_field to the column that holds the text")
        column_type = schema.field(self.text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise ValueError(f"column {self.text_field!r} of {path} holds {column_type}, not text: set data.text_field to a string column")
        row = 0
        # one row group at a time, only the text column (iter_batches read ahead over the whole file)
        for group in range(parquet.num_row_groups):
            for value in parquet.read_row_group(group, columns=[self.text_field]).column(0).to_pylist():
                row += 1
                if value is None:
                    self.stats.parquet_skipped_rows += 1
                    continue
                self.stats.text_bytes += len(value.encode("utf-8"))
                if value.strip():
                    yield from self._limited(value, path, f"row {row}")

    def _skip_record(self, path: Path, where: str, why: str) -> None:
        self.stats.jsonl_skipped_records += 1
        if self.stats.jsonl_skipped_records <= MAX_WARNINGS:
            log.warning("%s:%s: JSONL record skipped: %s", path, where, why)


def corpus_reader(cfg) -> CorpusReader:
    """The reader of ``cfg.data.corpus`` with the config's reading options."""
    data = cfg.data
    return CorpusReader(
        data.corpus, text_field=data.text_field, doc_separator=data.doc_separator, utf8_errors=data.utf8_errors,
        max_record_bytes=data.max_record_bytes, oversize=data.oversize,
    )


def _utf8_boundary(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a UTF-8 character."""
    lead = len(data) - 1
    while lead > 0 and len(data) - lead < 4 and data[lead] & 0xC0 == 0x80:
        lead -= 1
    if lead < 0 or data[lead] < 0xC0:
        return len(data)  # ends in ASCII or in bytes that are invalid anyway
    needed = 2 if data[lead] < 0xE0 else 3 if data[lead] < 0xF0 else 4
    return lead if len(data) - lead < needed else len(data)
