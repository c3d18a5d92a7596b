"""`pretrain prepare` end to end: corpus -> tokenizer -> packed sequences -> shards + manifest.

Steps, none holding the corpus in memory:
1. tokenizer: a seeded sample of documents (about ``tokenizer.sample_bytes``) trains SentencePiece,
   unless ``tokenizer.model_path`` names a model to reuse (one step, one process);
2. parts: the corpus is cut into parts, each file one part, and an uncompressed text or JSONL
   file over ``data.part_bytes`` one part per byte range of that size (a line, or a paragraph,
   belongs to the range its first line starts in; compressed files and Parquet stay whole). Each part is tokenised, its documents sent to the
   train or valid split (a draw seeded by the part, so no document straddles the splits), packed
   and written to its own shards ``<split>/shard-<part>-<n>.tar``, and its result to
   ``parts/part-<part>.json``. Parts are independent: a pool of ``data.num_proc`` processes
   (SentencePiece keeps nothing worth sharing) or the tasks of a SLURM array run them in any order;
   each process holds one chunk of documents and one open shard at a time;
3. manifest: every part's result is checked (present, for the same slice of the same file, shards
   present with their recorded size; every reader checks each shard's sha256 when it loads it) and
   merged, in part order, into manifest.json.
Same corpus + same config ⇒ byte-identical tokenizer, shards and manifest, whatever the number
of processes or tasks. Only the last sequence of each part and split is padded. Timings do not
go into the manifest (it would no longer be reproducible) but into ``prepare_report.json``.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from pretrain.config import Config, save_resolved
from pretrain.data.corpus import GZIP_MAGIC, ZSTD_MAGIC, CorpusReader, CorpusStats, corpus_reader
from pretrain.data.manifest import FORMAT, MANIFEST_NAME, PREPARE_HINT, missing_or_resized_shards, write_manifest
from pretrain.data.packing import SequencePacker
from pretrain.data.shards import ShardWriter, remove_old_shards
from pretrain.data.tokenizer import SPECIAL_IDS, encode_batch, file_sha256, load_tokenizer, sample_documents, train_tokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "valid")


def output_splits(cfg: Config) -> tuple[str, ...]:
    """The splits prepare writes: both, or only valid for a held-out corpus (data.eval_only)."""
    return ("valid",) if cfg.data.eval_only else SPLITS
TOKENIZER_FILE = "tokenizer.model"
REPORT_NAME = "prepare_report.json"
PARTS_DIR = "parts"
# The tokenizer sample is drawn from whole parts worth this many times tokenizer.sample_bytes.
SAMPLE_SCAN_FACTOR = 10
MANIFEST_CLAIM = "manifest.claimed"
# Documents handed to SentencePiece per encode call (and all a part's process holds of them).
ENCODE_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Part:
    """A slice of the corpus that one process tokenises and writes: a file, or bytes [start, end) of it."""

    index: int
    file: str
    start: int = 0
    end: int | None = None  # None: to the end of the file

    def describe(self) -> str:
        return self.file if self.end is None else f"{self.file} bytes {self.start}-{self.end}"


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_dataset(cfg: Config, *, progress: bool = True, processes: int | None = None) -> dict:
    """Build ``cfg.data_dir`` (layout in docs/INTERFACES.md) with all three steps in this run and
    return its manifest. ``processes`` overrides ``data.num_proc`` (0 there: all CPUs)."""
    started = time.perf_counter()
    reader = start_prepare(cfg)
    tokenizer_started = time.perf_counter()
    prepare_tokenizer(cfg, reader)
    tokenizer_seconds = time.perf_counter() - tokenizer_started

    encode_started = time.perf_counter()
    parts = plan_parts(cfg, reader)
    processes = processes or cfg.data.num_proc or available_cpus()
    run_parts(cfg, parts, processes, progress)
    encode_seconds = time.perf_counter() - encode_started
    manifest = write_dataset_manifest(cfg, reader, parts)

    total_tokens = sum(s["tokens"] for s in manifest["splits"].values())
    text_bytes = manifest["corpus"]["text_bytes"]
    report = {
        "text_bytes": text_bytes,
        "documents": manifest["corpus"]["documents"],
        "tokens": total_tokens,
        "parts": len(parts),
        "tokenizer_seconds": round(tokenizer_seconds, 3),
        "encode_seconds": round(encode_seconds, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
        "encode_mb_per_s": round(text_bytes / 1e6 / max(encode_seconds, 1e-9), 3),
        "encode_tokens_per_s": round(total_tokens / max(encode_seconds, 1e-9), 1),
        "processes": min(processes, len(parts)),
    }
    (cfg.data_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return manifest


def start_prepare(cfg: Config) -> CorpusReader:
    """Create the data dir and remove its manifest (it marks a complete data dir: an interrupted run
    must leave none) and the claim on writing the next one; the corpus reader."""
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    (cfg.data_dir / MANIFEST_NAME).unlink(missing_ok=True)
    (cfg.data_dir / PARTS_DIR / MANIFEST_CLAIM).unlink(missing_ok=True)
    return corpus_reader(cfg)


def prepare_task(cfg: Config, task_index: int, task_count: int, processes: int, *, manifest_when_complete: bool = False) -> dict | None:
    """Step 2 for one task of ``task_count`` (e.g. a SLURM array): the parts ``index::count`` of the
    plan, with ``processes`` processes. With ``manifest_when_complete``, the task that finds every
    part done afterwards (the last one to finish) writes the manifest; returns it, else None."""
    if not 0 <= task_index < task_count:
        raise ValueError(f"task index {task_index} is not in [0, task count {task_count})")
    if not (cfg.data_dir / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"no {cfg.data_dir / TOKENIZER_FILE}: run `pretrain prepare --step tokenizer` with the same config first")
    reader = start_prepare(cfg)
    parts = plan_parts(cfg, reader)
    mine = parts[task_index::task_count]
    log.info("task %d of %d: %d of the corpus's %d parts", task_index, task_count, len(mine), len(parts))
    run_parts(cfg, mine, processes)
    if not manifest_when_complete:
        return None
    inputs = part_inputs(cfg)
    done = [p for p in parts if _result_inputs(_part_result_path(cfg.data_dir, p.index)) == inputs]
    if len(done) < len(parts):
        log.info("%d of %d parts done: a task still running writes the manifest", len(done), len(parts))
        return None
    try:  # tasks finishing together may both see every part done: one claims the manifest
        with open(cfg.data_dir / PARTS_DIR / MANIFEST_CLAIM, "x") as claim:
            claim.write(f"task {task_index}\n")
    except FileExistsError:
        return None
    return write_dataset_manifest(cfg, reader, parts)


def finish_prepare(cfg: Config) -> dict:
    """Step 3 alone (e.g. a job that depends on the array): check every part and write the manifest."""
    reader = corpus_reader(cfg)
    return write_dataset_manifest(cfg, reader, plan_parts(cfg, reader))


def prepare_tokenizer(cfg: Config, reader: CorpusReader) -> Path:
    """Step 1: train the tokenizer on a sample of the corpus, or copy ``tokenizer.model_path``."""
    tokenizer_path = cfg.data_dir / TOKENIZER_FILE
    if cfg.data.eval_only and not cfg.tokenizer.model_path:
        raise ValueError(
            "data.eval_only (pretrain prepare --eval-only) scores a held-out corpus with an existing tokenizer: "
            "set tokenizer.model_path to the model's tokenizer.model (e.g. <workdir>/data/tokenizer.model)"
        )
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
        _train_on_sample(cfg, reader, estimate_text_bytes(reader.files), tokenizer_path)
    return tokenizer_path


def plan_parts(cfg: Config, reader: CorpusReader) -> list[Part]:
    """The corpus's parts, in corpus order; they depend only on the files and data.part_bytes."""
    parts: list[Part] = []
    for path in reader.files:
        size = path.stat().st_size
        if size > cfg.data.part_bytes and reader.splittable(path):
            for start in range(0, size, cfg.data.part_bytes):
                parts.append(Part(len(parts), str(path), start, min(start + cfg.data.part_bytes, size)))
        else:
            parts.append(Part(len(parts), str(path)))
    return parts


def run_parts(cfg: Config, parts: list[Part], processes: int, progress: bool = False, pool: concurrent.futures.Executor | None = None) -> None:
    """Step 2 for ``parts``: in this process when ``processes`` is 1, else in ``pool`` or a new pool
    of that many processes."""
    bar = tqdm(total=sum(Path(p.file).stat().st_size if p.end is None else p.end - p.start for p in parts),
               unit="B", unit_scale=True, desc="tokenize", disable=not progress, mininterval=0.5)
    own_pool = pool is None and processes > 1 and len(parts) > 1
    if own_pool:
        pool = part_pool(cfg, min(processes, len(parts)))
    if pool is None:
        _init_part_worker(cfg)
        results = map(process_part, parts)
    else:
        results = pool.map(process_part, parts)
    try:
        for part, _ in zip(parts, results):
            bar.update(Path(part.file).stat().st_size if part.end is None else part.end - part.start)
    finally:
        bar.close()
        if own_pool:
            pool.shutdown(cancel_futures=True)


def part_pool(cfg: Config, processes: int) -> concurrent.futures.ProcessPoolExecutor:
    """Processes that run parts of ``cfg``'s corpus (each loads the tokenizer once)."""
    # forkserver: no fork of a process whose threads (tqdm's monitor) may hold locks
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=processes, mp_context=multiprocessing.get_context("forkserver"), initializer=_init_part_worker, initargs=(cfg,),
    )


# One part, in whichever process runs it -------------------------------------------------------

_WORKER: dict = {}


def _init_part_worker(cfg: Config) -> None:
    _WORKER.update(cfg=cfg, reader=corpus_reader(cfg), tokenizer=load_tokenizer(cfg.data_dir / TOKENIZER_FILE), inputs=part_inputs(cfg))


def process_part(part: Part) -> dict:
    """Tokenise, split, pack and write one part; its result (also written to parts/part-N.json)."""
    cfg, reader, tokenizer = _WORKER["cfg"], _WORKER["reader"], _WORKER["tokenizer"]
    data_dir = cfg.data_dir
    splits_out = output_splits(cfg)
    for split in splits_out:
        remove_old_shards(data_dir, split, part=part.index)
    writers = {s: ShardWriter(data_dir, s, cfg.data.samples_per_shard, part=part.index) for s in splits_out}
    packers = {s: SequencePacker(cfg.data.seq_len, eos_id=SPECIAL_IDS["eos"], pad_id=SPECIAL_IDS["pad"]) for s in splits_out}
    # seeded by the part alone: the same draws whichever process or task runs it (part 0 of a
    # one-file corpus draws exactly as the single-stream prepare did, seed + 1)
    split_rng = random.Random(cfg.data.seed + 1 + (part.index << 32))
    documents_per_split = {s: 0 for s in splits_out}
    reader.stats = CorpusStats(files=[part.file])

    def write_chunk(chunk: list[str]) -> None:
        by_split: dict[str, list[list[int]]] = {s: [] for s in splits_out}
        for ids in encode_batch(tokenizer, chunk, 1):
            to_valid = cfg.data.eval_only or split_rng.random() < cfg.data.valid_fraction
            by_split["valid" if to_valid else "train"].append(ids)
        for split, docs in by_split.items():
            documents_per_split[split] += len(docs)
            for input_ids, doc_ids in packers[split].add(docs):
                writers[split].write(input_ids, doc_ids)

    chunk: list[str] = []
    chunk_bytes = 0
    for document in reader.file_documents(Path(part.file), part.start, part.end):
        chunk.append(document)
        chunk_bytes += len(document)
        if chunk_bytes >= ENCODE_CHUNK_BYTES:
            write_chunk(chunk)
            chunk, chunk_bytes = [], 0
    if chunk:
        write_chunk(chunk)
    splits = {}
    for split in splits_out:
        for input_ids, doc_ids in packers[split].flush():
            writers[split].write(input_ids, doc_ids)
        shards = writers[split].close()
        splits[split] = {"documents": documents_per_split[split], "samples": writers[split].samples, "tokens": writers[split].tokens, "shards": shards}
    stats = reader.stats.as_dict()
    del stats["files"]
    result = {"part": asdict(part), "inputs": _WORKER["inputs"], "splits": splits, "corpus": stats}
    path = _part_result_path(data_dir, part.index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return result


def part_inputs(cfg: Config) -> dict:
    """What a part's output depends on besides its slice: the tokenizer and the data config (a result
    with other inputs is a stale one from an earlier prepare, never merged)."""
    data = cfg.data.model_dump(include={"seq_len", "samples_per_shard", "valid_fraction", "seed", "text_field", "doc_separator",
                                        "utf8_errors", "max_record_bytes", "oversize", "part_bytes", "eval_only"})
    return {"tokenizer_sha256": file_sha256(cfg.data_dir / TOKENIZER_FILE), "data": data}


def _result_inputs(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()).get("inputs")
    except (OSError, ValueError):
        return None


def _part_result_path(data_dir: Path, index: int) -> Path:
    return Path(data_dir) / PARTS_DIR / f"part-{index:05d}.json"


# Step 3 ---------------------------------------------------------------------------------------

def write_dataset_manifest(cfg: Config, reader: CorpusReader, parts: list[Part]) -> dict:
    """Check every part's result and shards, merge them in part order and write manifest.json."""
    data_dir = cfg.data_dir
    splits_out = output_splits(cfg)
    tokenizer_path = data_dir / TOKENIZER_FILE
    tokenizer = load_tokenizer(tokenizer_path)
    stats = CorpusStats(files=[str(p) for p in reader.files])
    inputs = part_inputs(cfg)
    splits = {s: {"documents": 0, "samples": 0, "tokens": 0, "shards": []} for s in splits_out}
    for part in parts:
        result = _checked_part_result(cfg, part, inputs)
        stats.add(CorpusStats(**result["corpus"]))
        for split in splits_out:
            for key in ("documents", "samples", "tokens"):
                splits[split][key] += result["splits"][split][key]
            splits[split]["shards"] += result["splits"][split]["shards"]
    # shards and results of parts a previous run had and this one has not
    for split in SPLITS:
        remove_old_shards(data_dir, split, keep=frozenset(s["name"] for s in splits.get(split, {"shards": []})["shards"]))
    current = {_part_result_path(data_dir, p.index) for p in parts}
    for stale in sorted((data_dir / PARTS_DIR).glob("part-*.json")):
        if stale not in current:
            stale.unlink()
    reader.stats = stats
    if stats.documents == 0:
        raise ValueError(_empty_corpus_message(cfg, reader))
    if cfg.data.valid_fraction > 0 and not cfg.data.eval_only and splits["valid"]["samples"] == 0:
        raise ValueError(
            f"no document of the {stats.documents} in the corpus was drawn for the valid split "
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
        "part_bytes": cfg.data.part_bytes,
        "eval_only": cfg.data.eval_only,
        "splits": splits,
        "corpus": stats.as_dict(),
    }
    write_manifest(data_dir, manifest)
    save_resolved(cfg, data_dir)
    return manifest


def _checked_part_result(cfg: Config, part: Part, inputs: dict) -> dict:
    data_dir = cfg.data_dir
    path = _part_result_path(data_dir, part.index)
    rerun = f"rerun that part (pretrain prepare --step parts), or {PREPARE_HINT}"
    if not path.is_file():
        raise FileNotFoundError(f"part {part.index} ({part.describe()}) has no result {path}: its prepare task did not finish; {rerun}")
    result = json.loads(path.read_text())
    if result.get("inputs") != inputs:
        raise ValueError(f"{path} was made with another tokenizer or data config than this prepare's (a previous run's result); {rerun}")
    if result.get("part") != asdict(part):
        raise ValueError(f"{path} is for {result.get('part')}, not for part {part.index} of this corpus ({part.describe()}): the corpus or data.part_bytes changed; {rerun}")
    for split in output_splits(cfg):
        # sizes only: re-hashing every shard would be a serial pass over the whole output, and
        # every reader checks each shard's sha256 when it loads it
        problems = missing_or_resized_shards(data_dir, result["splits"][split]["shards"], recorded_in=str(path))
        if problems:
            raise ValueError(f"part {part.index} ({part.describe()}): shard {problems[0]}; {rerun}")
    return result


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


def sample_parts(cfg: Config, parts: list[Part]) -> list[Part]:
    """The parts the tokenizer sample is drawn from: all of them, or for a corpus over
    SAMPLE_SCAN_FACTOR x tokenizer.sample_bytes, a seeded draw of whole parts about that large (in
    corpus order): one serial pass over all of a 100 GB corpus for a 20 MB sample would take as long
    as the parallel tokenisation."""
    sizes = [estimate_text_bytes([Path(p.file)]) if p.end is None else p.end - p.start for p in parts]
    limit = SAMPLE_SCAN_FACTOR * cfg.tokenizer.sample_bytes
    if sum(sizes) <= limit:
        return parts
    chosen, total = [], 0
    for index in random.Random(cfg.data.seed).sample(range(len(parts)), len(parts)):
        chosen.append(index)
        total += sizes[index]
        if total >= limit:
            break
    return [parts[i] for i in sorted(chosen)]


def _train_on_sample(cfg: Config, reader: CorpusReader, estimated_bytes: int, tokenizer_path: Path) -> None:
    all_parts = plan_parts(cfg, reader)
    parts = sample_parts(cfg, all_parts)
    documents = (doc for part in parts for doc in reader.file_documents(Path(part.file), part.start, part.end))
    sample = sample_documents(documents, cfg.tokenizer.sample_bytes, cfg.data.seed, cfg.tokenizer.sample_doc_bytes)
    if not sample.sentences and len(parts) < len(all_parts):  # the drawn parts were empty: look at all of them
        parts = all_parts
        sample = sample_documents(reader, cfg.tokenizer.sample_bytes, cfg.data.seed, cfg.tokenizer.sample_doc_bytes)
    # Only a corpus without any document gives an empty sample; SentencePiece's own error says nothing about it.
    if not sample.sentences:
        raise ValueError(_empty_corpus_message(cfg, reader))
    log.info(
        "training a %s tokenizer (vocab %d) on %d documents (%.1f MB, %d cut to the per-document cap) drawn from %d of the %d parts of about %.1f MB",
        cfg.tokenizer.model_type, cfg.tokenizer.vocab_size, sample.documents, sample.bytes / 1e6, sample.capped_documents,
        len(parts), len(all_parts), estimated_bytes / 1e6,
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
