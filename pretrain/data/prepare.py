"""`pretrain prepare` end to end: corpus -> tokenizer -> packed sequences -> shards + manifest.

Two passes over the corpus, none holding it in memory:
1. a seeded sample of documents (about ``tokenizer.sample_bytes``) trains SentencePiece, unless
   ``tokenizer.model_path`` names a model to reuse;
2. every document is tokenised (SentencePiece's own threads, ``data.num_proc``), sent to the train
   or valid split (a seeded draw per document, so no document straddles the splits), packed
   and written to shards.
Same corpus + same config ⇒ byte-identical tokenizer, shards and manifest. Timings do not go
into the manifest (it would no longer be reproducible) but into ``prepare_report.json``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from pretrain.config import Config, save_resolved
from pretrain.data.corpus import GZIP_MAGIC, ZSTD_MAGIC, CorpusReader, corpus_reader
from pretrain.data.manifest import FORMAT, MANIFEST_NAME, write_manifest
from pretrain.data.packing import SequencePacker
from pretrain.data.shards import ShardWriter, remove_old_shards
from pretrain.data.tokenizer import SPECIAL_IDS, encode_batch, file_sha256, load_tokenizer, sample_documents, train_tokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "valid")
TOKENIZER_FILE = "tokenizer.model"
REPORT_NAME = "prepare_report.json"
# Documents handed to SentencePiece per encode call: large enough to keep its threads busy.
ENCODE_CHUNK_BYTES = 1 << 20


def prepare_dataset(cfg: Config, *, progress: bool = True) -> dict:
    """Build ``cfg.data_dir`` (layout in docs/INTERFACES.md) and return its manifest."""
    started = time.perf_counter()
    data_dir = cfg.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    # The manifest marks a complete data dir: remove it first, so an interrupted run leaves none.
    (data_dir / MANIFEST_NAME).unlink(missing_ok=True)
    reader = corpus_reader(cfg)
    estimated_bytes = estimate_text_bytes(reader.files)
    threads = cfg.data.num_proc or os.cpu_count() or 1

    tokenizer_started = time.perf_counter()
    tokenizer_path = data_dir / TOKENIZER_FILE
    if cfg.tokenizer.model_path:
        source = Path(cfg.tokenizer.model_path)
        if not source.is_file():
            raise FileNotFoundError(
                f"tokenizer.model_path {source} not found: point it at a SentencePiece .model file, "
                "or leave it empty to train a tokenizer on the corpus"
            )
        load_tokenizer(source)  # fails early, naming the file, if it is not a usable model
        if source.resolve() != tokenizer_path.resolve():
            shutil.copyfile(source, tokenizer_path)
        log.info("reusing tokenizer %s", source)
    else:
        _train_on_sample(cfg, reader, estimated_bytes, tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer_seconds = time.perf_counter() - tokenizer_started

    encode_started = time.perf_counter()
    splits = _tokenize_and_write(cfg, reader, tokenizer, threads, estimated_bytes, progress)
    encode_seconds = time.perf_counter() - encode_started
    if reader.stats.documents == 0:
        raise ValueError(_empty_corpus_message(cfg, reader))
    if cfg.data.valid_fraction > 0 and splits["valid"]["samples"] == 0:
        raise ValueError(
            f"no document of the {reader.stats.documents} in the corpus was drawn for the valid split "
            f"(data.valid_fraction={cfg.data.valid_fraction}): use a larger corpus or valid_fraction, or 0 for no valid split"
        )

    manifest = {
        "format": FORMAT,
        "seq_len": cfg.data.seq_len,
        "vocab_size": tokenizer.get_piece_size(),
        "tokenizer_file": TOKENIZER_FILE,
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "special_ids": dict(SPECIAL_IDS),
        "seed": cfg.data.seed,
        "doc_separator": cfg.data.doc_separator,
        "splits": splits,
        "corpus": reader.stats.as_dict(),
    }
    write_manifest(data_dir, manifest)
    save_resolved(cfg, data_dir)
    total_tokens = sum(s["tokens"] for s in splits.values())
    report = {
        "text_bytes": reader.stats.text_bytes,
        "documents": reader.stats.documents,
        "tokens": total_tokens,
        "tokenizer_seconds": round(tokenizer_seconds, 3),
        "encode_seconds": round(encode_seconds, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
        "encode_mb_per_s": round(reader.stats.text_bytes / 1e6 / max(encode_seconds, 1e-9), 3),
        "encode_tokens_per_s": round(total_tokens / max(encode_seconds, 1e-9), 1),
        "threads": threads,
    }
    (data_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return manifest


def estimate_text_bytes(files: list[Path]) -> int:
    """Uncompressed corpus size without reading it: file sizes; for gzip the size in its trailer,
    for zstd the size in its frame header when the compressor wrote it.

    (The gzip trailer holds the size modulo 4 GiB of the last member: an estimate, used only for
    the progress bar.)
    """
    total = 0
    for path in files:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(18)
            if head.startswith(GZIP_MAGIC) and size >= 18:
                f.seek(-4, os.SEEK_END)
                stored = int.from_bytes(f.read(4), "little")
                # gzip never grows data by more than a header and ~0.1%: a smaller value wrapped around
                while stored + 64 + size // 1000 < size:
                    stored += 1 << 32
                size = stored
            elif head.startswith(ZSTD_MAGIC):
                import zstandard

                stored = zstandard.frame_content_size(head)
                size = stored if stored >= 0 else 4 * size  # unknown: assume a typical text ratio
        total += size
    return total


def _train_on_sample(cfg: Config, reader: CorpusReader, estimated_bytes: int, tokenizer_path: Path) -> None:
    sample = sample_documents(reader, cfg.tokenizer.sample_bytes, cfg.data.seed, cfg.tokenizer.sample_doc_bytes)
    # Only a corpus without any document gives an empty sample; SentencePiece's own error says nothing about it.
    if not sample.sentences:
        raise ValueError(_empty_corpus_message(cfg, reader))
    log.info(
        "training a %s tokenizer (vocab %d) on %d documents (%.1f MB, %d cut to the per-document cap) of about %.1f MB",
        cfg.tokenizer.model_type, cfg.tokenizer.vocab_size, sample.documents, sample.bytes / 1e6, sample.capped_documents, estimated_bytes / 1e6,
    )
    processor = train_tokenizer(
        sample.sentences,
        tokenizer_path,
        model_type=cfg.tokenizer.model_type,
        vocab_size=cfg.tokenizer.vocab_size,
        character_coverage=cfg.tokenizer.character_coverage,
        seed=cfg.data.seed,
        # SentencePiece's multi-threaded unigram trainer gave different models for the same input
        # across runs on this machine; one thread keeps prepare reproducible.
        num_threads=1,
        source=_files_text(reader.files),
    )
    if processor.get_piece_size() < cfg.tokenizer.vocab_size:
        log.warning(
            "the tokenizer has %d pieces, fewer than tokenizer.vocab_size=%d: its sample (%d documents, %.2f MB of %s) "
            "does not support more; give a larger corpus or tokenizer.sample_bytes, or lower tokenizer.vocab_size",
            processor.get_piece_size(), cfg.tokenizer.vocab_size, sample.documents, sample.bytes / 1e6, _files_text(reader.files),
        )


def _tokenize_and_write(cfg: Config, reader: CorpusReader, tokenizer, threads: int, estimated_bytes: int, progress: bool) -> dict:
    data_dir = cfg.data_dir
    for split in SPLITS:
        remove_old_shards(data_dir, split)
    writers = {s: ShardWriter(data_dir, s, cfg.data.samples_per_shard) for s in SPLITS}
    packers = {s: SequencePacker(cfg.data.seq_len, eos_id=SPECIAL_IDS["eos"], pad_id=SPECIAL_IDS["pad"]) for s in SPLITS}
    split_rng = random.Random(cfg.data.seed + 1)  # independent of the tokenizer sample's draws
    documents_per_split = {s: 0 for s in SPLITS}

    def write_chunk(chunk: list[str]) -> None:
        by_split: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
        for ids in encode_batch(tokenizer, chunk, threads):
            split = "valid" if split_rng.random() < cfg.data.valid_fraction else "train"
            by_split[split].append(ids)
        for split, docs in by_split.items():
            documents_per_split[split] += len(docs)
            for input_ids, doc_ids in packers[split].add(docs):
                writers[split].write(input_ids, doc_ids)

    bar = tqdm(total=estimated_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress, mininterval=0.5)
    chunk: list[str] = []
    chunk_bytes = 0
    bytes_seen = 0
    for document in reader:
        chunk.append(document)
        chunk_bytes += len(document)
        if chunk_bytes >= ENCODE_CHUNK_BYTES:
            write_chunk(chunk)
            chunk, chunk_bytes = [], 0
            bar.update(reader.stats.text_bytes - bytes_seen)
            bytes_seen = reader.stats.text_bytes
    if chunk:
        write_chunk(chunk)
    bar.update(reader.stats.text_bytes - bytes_seen)
    bar.close()

    splits = {}
    for split in SPLITS:
        for input_ids, doc_ids in packers[split].flush():
            writers[split].write(input_ids, doc_ids)
        shards = writers[split].close()
        splits[split] = {"documents": documents_per_split[split], "samples": writers[split].samples, "tokens": writers[split].tokens, "shards": shards}
    return splits


def _files_text(files: list[Path]) -> str:
    names = [str(f) for f in files[:3]]
    return ", ".join(names) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")


def _empty_corpus_message(cfg: Config, reader: CorpusReader) -> str:
    stats = reader.stats
    return (
        f"the corpus holds no text: {_files_text(reader.files)} gave {stats.documents} documents ({stats.text_bytes} bytes read, "
        f"{stats.utf8_skipped_lines} lines skipped for invalid UTF-8, {stats.jsonl_skipped_records} JSONL records skipped): "
        f"check data.corpus, data.text_field ({cfg.data.text_field!r}) and data.utf8_errors"
    )
