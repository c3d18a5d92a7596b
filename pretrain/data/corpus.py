"""Stage 1 of `pretrain prepare`: read the raw corpus into a stream of documents.

Inputs (``data.corpus``): files, directories (every non-hidden file below, sorted) and globs
(``**`` allowed). A file is gzip-compressed when it starts with the gzip magic bytes, whatever its
name; it is JSONL when its name (without ``.gz``) ends in ``.jsonl``, ``.ndjson`` or ``.json``.

What a document is:
- plain text, ``data.doc_separator: line`` (default): every non-empty line;
- plain text, ``data.doc_separator: blank_line``: a paragraph, i.e. consecutive non-blank lines
  joined with ``\\n`` and separated by one or more blank lines;
- JSONL: the string ``record[data.text_field]`` of each record (one record per line).

Nothing is dropped silently: invalid UTF-8 follows ``data.utf8_errors`` (``replace`` with U+FFFD,
or ``skip`` the line), unreadable JSONL records are skipped, and each case is counted in
``CorpusStats`` (written to the manifest) and logged. A file that cannot be read at all (truncated
gzip, no record with the text field) is an error naming the file.
"""
from __future__ import annotations

import glob
import gzip
import json
import logging
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from pretrain.config import REPO_ROOT

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
# Magic numbers of common binary files that end up in a corpus directory by mistake.
BINARY_MAGICS = {b"\x7fELF": "an ELF executable", b"PK\x03\x04": "a zip archive", b"%PDF": "a PDF", b"\x89PNG": "a PNG image", b"PAR1": "a Parquet file"}
# Bytes looked at to tell text from binary, and the share of them that may be control or invalid bytes.
SNIFF_BYTES = 8192
MAX_NON_TEXT_SHARE = 0.1
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
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

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_corpus_files(entries: list[str]) -> list[Path]:
    """Expand files, directories and globs into a sorted, de-duplicated list of files.

    A relative entry that does not exist under the working directory is looked up under the
    repository root, so the embedded demo corpus (``data/corpus``) is found from anywhere.
    """
    if not entries:
        raise ValueError("data.corpus is empty: list text/JSONL files, directories or globs, e.g. data.corpus=[data/corpus]")
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


def is_jsonl(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.endswith(JSONL_SUFFIXES)


def _open_binary(path: Path):
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")


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


class CorpusReader:
    """Iterate over the documents of a corpus, counting what it reads (``self.stats``).

    Each iteration re-reads the files from the start, so `prepare` can make several passes
    (size, tokenizer sample, tokenisation) without holding the corpus in memory.
    """

    def __init__(self, entries: list[str], *, text_field: str = "text", doc_separator: str = "line", utf8_errors: str = "replace"):
        if utf8_errors not in ("replace", "skip"):
            raise ValueError(f"data.utf8_errors must be 'replace' or 'skip', got {utf8_errors!r}")
        if doc_separator not in ("line", "blank_line"):
            raise ValueError(f"data.doc_separator must be 'line' or 'blank_line', got {doc_separator!r}")
        self.files = resolve_corpus_files(entries)
        self.text_field = text_field
        self.doc_separator = doc_separator
        self.utf8_errors = utf8_errors
        self.stats = CorpusStats(files=[str(p) for p in self.files])

    def __iter__(self) -> Iterator[str]:
        self.stats = CorpusStats(files=[str(p) for p in self.files])
        for path in self.files:
            yield from self._file_documents(path)

    # Per file ----------------------------------------------------------------------------------
    def _file_documents(self, path: Path) -> Iterator[str]:
        try:
            with _open_binary(path) as stream:
                reason = non_text_reason(stream.read(SNIFF_BYTES))
                if reason:
                    raise ValueError(f"corpus file {path} is not text ({reason}): remove it from data.corpus")
                stream.seek(0)
                lines = self._decoded_lines(stream, path)
                if is_jsonl(path):
                    yield from self._jsonl_documents(lines, path)
                else:
                    yield from self._text_documents(lines)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise ValueError(f"corpus file {path} is a corrupt or truncated gzip file ({exc}): re-create it or remove it from data.corpus") from None
        except OSError as exc:
            raise ValueError(f"cannot read corpus file {path}: {exc}") from None

    def _decoded_lines(self, stream, path: Path) -> Iterator[tuple[int, str]]:
        """(line number, text without the newline); bad UTF-8 replaced or skipped per policy."""
        for number, raw in enumerate(stream, start=1):
            self.stats.text_bytes += len(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if self.utf8_errors == "skip":
                    self.stats.utf8_skipped_lines += 1
                    if self.stats.utf8_skipped_lines <= MAX_WARNINGS:
                        log.warning("%s:%d: invalid UTF-8 (%s); line skipped (data.utf8_errors=skip)", path, number, exc.reason)
                    continue
                self.stats.utf8_replaced_lines += 1
                if self.stats.utf8_replaced_lines <= MAX_WARNINGS:
                    log.warning("%s:%d: invalid UTF-8 (%s); bad bytes replaced by U+FFFD (data.utf8_errors=replace)", path, number, exc.reason)
                text = raw.decode("utf-8", errors="replace")
            yield number, text.rstrip("\r\n")

    def _text_documents(self, lines: Iterator[tuple[int, str]]) -> Iterator[str]:
        if self.doc_separator == "line":
            for _, text in lines:
                if text.strip():
                    self.stats.documents += 1
                    yield text
            return
        paragraph: list[str] = []
        for _, text in lines:
            if text.strip():
                paragraph.append(text)
            elif paragraph:
                self.stats.documents += 1
                yield "\n".join(paragraph)
                paragraph = []
        if paragraph:
            self.stats.documents += 1
            yield "\n".join(paragraph)

    def _jsonl_documents(self, lines: Iterator[tuple[int, str]], path: Path) -> Iterator[str]:
        records = documents = 0
        first_keys = None
        for number, text in lines:
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
                self.stats.documents += 1
                yield value
        if records and not documents and first_keys is not None and self.text_field not in first_keys:
            raise ValueError(
                f"no record in {path} has the text field {self.text_field!r} (the first record's keys are "
                f"{first_keys}): set data.text_field to the field that holds the text"
            )

    def _skip_record(self, path: Path, number: int, why: str) -> None:
        self.stats.jsonl_skipped_records += 1
        if self.stats.jsonl_skipped_records <= MAX_WARNINGS:
            log.warning("%s:%d: JSONL record skipped: %s", path, number, why)
