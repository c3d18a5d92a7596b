"""`pretrain bench data`: tokenisation throughput of `prepare`, and streaming throughput of the loader.

Builds a small dataset from a slice of the corpus in a temporary directory, then measures, side by
side in one run: SentencePiece encoding with 1 thread vs all threads, the whole tokenise+pack+write
pass, that pass against the number of prepare processes (1, 2, all cores; rounds interleaved,
wall time since the work is spread over processes, median [min, max] of ``--repeats``, the ideal
ratio beside the measured one, and whether every setting wrote the same bytes), reading shards in
one process, the loader with 0 / N DataLoader workers, and how long a restored loader takes to
produce its first batch compared with a fresh one.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

HELP = "tokenisation (MB/s, tokens/s) and streaming (samples/s, tokens/s) throughput"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default=None, help="text file (gzip or not) to slice; default: the embedded demo corpus")
    parser.add_argument("--mb", type=float, default=3.0, help="MB of text to prepare")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=200, help="batches timed per loader setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to compare")
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--processes", type=int, nargs="+", default=None, help="prepare process counts to compare (default: 1, 2, all cores)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per process count")


def _corpus_slice(source: Path, n_bytes: int, out: Path) -> None:
    with open(source, "rb") as probe:
        opener = gzip.open if probe.read(2) == b"\x1f\x8b" else open
    with opener(source, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read(n_bytes)
    out.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")


def _time_loader(make, batches: int) -> dict:
    loader = make()
    started = time.perf_counter()
    first_batch_s = None
    samples = tokens = 0
    for i, batch in enumerate(loader):
        if i == 0:
            first_batch_s = time.perf_counter() - started
            timed_from = time.perf_counter()  # steady state: leave out worker start-up
            continue
        samples += batch["input_ids"].shape[0]
        tokens += int((batch["doc_ids"] >= 0).sum())
        if i == batches:
            break
    seconds = time.perf_counter() - timed_from
    return {"first_batch_s": round(first_batch_s, 3), "samples_per_s": round(samples / seconds, 1), "tokens_per_s": round(tokens / seconds, 1), "loader": loader}


def run(args: argparse.Namespace) -> dict:
    from pretrain.config import REPO_ROOT, load_config
    from pretrain.data.prepare import REPORT_NAME, prepare_dataset
    from pretrain.data.stream import build_loader, iter_samples
    from pretrain.data.tokenizer import encode_batch, load_tokenizer

    if args.mb <= 0 or args.batches < 1 or args.batch_size < 1 or not args.workers or min(args.workers) < 0:
        raise ValueError("--mb must be positive, --batches and --batch-size at least 1, --workers counts of 0 or more")
    if args.repeats < 5 or (args.processes and min(args.processes) < 1):
        raise ValueError("--repeats must be at least 5 (medians need them), --processes counts at least 1")
    source = Path(args.corpus) if args.corpus else REPO_ROOT / "data" / "corpus" / "wordnet_glosses.txt.gz"
    if not source.is_file():
        raise FileNotFoundError(f"--corpus {source} not found: give a text file (gzip or not)")
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        _corpus_slice(source, int(args.mb * 1e6), corpus)
        cfg = load_config(None, [
            f"workdir={tmp / 'work'}", f"data.corpus=[{corpus}]", f"tokenizer.vocab_size={args.vocab_size}",
            f"data.seq_len={args.seq_len}", "data.samples_per_shard=1024", "data.valid_fraction=0.01",
        ])
        manifest = prepare_dataset(cfg, progress=False)
        report = json.loads((cfg.data_dir / REPORT_NAME).read_text())
        data_dir = cfg.data_dir
        scaling = _prepare_scaling(corpus, data_dir, tmp / "scaling", args)

        # SentencePiece alone, 1 thread vs all: the share of prepare that parallelises.
        tokenizer = load_tokenizer(data_dir / "tokenizer.model")
        lines = [line for line in corpus.read_text(encoding="utf-8").split("\n") if line.strip()]
        encode = {}
        for threads in sorted({1, os.cpu_count() or 1}):
            started = time.perf_counter()
            n_tokens = sum(len(ids) for ids in encode_batch(tokenizer, lines, threads))
            seconds = time.perf_counter() - started
            encode[f"threads_{threads}"] = {"mb_per_s": round(corpus.stat().st_size / 1e6 / seconds, 2), "tokens_per_s": round(n_tokens / seconds, 1)}

        started = time.perf_counter()
        n_read = sum(1 for _ in iter_samples(data_dir, "train"))
        read_seconds = time.perf_counter() - started

        def make(workers, state=None):
            def build():
                loader = build_loader(data_dir, "train", batch_size=args.batch_size, rank=0, world_size=1, num_workers=workers, seed=0, shuffle_buffer=args.shuffle_buffer)
                if state is not None:
                    loader.load_state_dict(state)
                return loader
            return build

        streaming = {}
        for workers in args.workers:
            timing = _time_loader(make(workers), args.batches)
            state = timing.pop("loader").state_dict()
            restored = _time_loader(make(workers, state), 1)
            streaming[f"workers_{workers}"] = {**timing, "restored_first_batch_s": restored["first_batch_s"]}
        base = streaming[f"workers_{args.workers[0]}"]["samples_per_s"]
        for name, row in streaming.items():
            row[f"samples_per_s_ratio_vs_workers_{args.workers[0]}"] = round(row["samples_per_s"] / base, 2)

    one, many = encode["threads_1"], encode[f"threads_{max(1, os.cpu_count() or 1)}"]
    return {
        "suite": "data",
        "corpus_mb": round(report["text_bytes"] / 1e6, 2),
        "seq_len": args.seq_len,
        "train_samples": manifest["splits"]["train"]["samples"],
        "tokenizer_train_s": report["tokenizer_seconds"],
        "prepare_encode_pack_write": {"mb_per_s": report["encode_mb_per_s"], "tokens_per_s": report["encode_tokens_per_s"], "processes": report["processes"]},
        "prepare_processes": scaling,
        "sentencepiece_encode": {**encode, "threads_ratio": round(many["tokens_per_s"] / one["tokens_per_s"], 2)},
        "read_shards_one_process": {"samples_per_s": round(n_read / read_seconds, 1), "tokens_per_s": round(n_read * args.seq_len / read_seconds, 1)},
        "streaming": streaming,
    }


def _prepare_scaling(corpus: Path, data_dir: Path, out: Path, args: argparse.Namespace) -> dict:
    """Tokenise+pack+write of the same parts with 1, 2, ... processes, rounds interleaved."""
    import statistics

    from pretrain.config import load_config
    from pretrain.data.manifest import manifest_sha256
    from pretrain.data.prepare import available_cpus, part_pool, plan_parts, prepare_tokenizer, run_parts, start_prepare, write_dataset_manifest

    cores = available_cpus()
    counts = sorted(set(args.processes or [1, 2, cores]))
    # enough byte-range parts that every process count has several each
    part_bytes = max(10_000, corpus.stat().st_size // (4 * max(counts)))
    cfg = load_config(None, [
        f"workdir={out}", f"data.corpus=[{corpus}]", f"tokenizer.model_path={data_dir / 'tokenizer.model'}", f"data.part_bytes={part_bytes}",
        f"data.seq_len={args.seq_len}", "data.samples_per_shard=1024", "data.valid_fraction=0.01",
    ])
    reader = start_prepare(cfg)
    prepare_tokenizer(cfg, reader)
    parts = plan_parts(cfg, reader)
    seconds: dict[int, list[float]] = {n: [] for n in counts}
    fingerprints: dict[int, str] = {}
    # pools started once and warmed by an untimed round: process start-up is not throughput
    pools = {n: part_pool(cfg, n) for n in counts if n > 1}
    try:
        for round_ in range(args.repeats + 1):
            for n in counts:  # interleaved: load from other jobs hits every setting alike
                started = time.perf_counter()
                run_parts(cfg, parts, n, pool=pools.get(n))
                if round_:
                    seconds[n].append(time.perf_counter() - started)
                manifest = write_dataset_manifest(cfg, reader, parts)
                fingerprints[n] = manifest_sha256(cfg.data_dir)  # the manifest holds every shard's sha256
    finally:
        for pool in pools.values():
            pool.shutdown()
    text_mb = manifest["corpus"]["text_bytes"] / 1e6
    tokens = sum(split["tokens"] for split in manifest["splits"].values())
    base = statistics.median(seconds[counts[0]])
    rows = {}
    for n in counts:
        runs = seconds[n]
        ideal = min(n, len(parts), cores) / min(counts[0], len(parts), cores)
        rows[f"processes_{n}"] = {
            "mb_per_s": round(text_mb / statistics.median(runs), 3),
            "mb_per_s_min_max": [round(text_mb / max(runs), 3), round(text_mb / min(runs), 3)],
            "tokens_per_s": round(tokens / statistics.median(runs), 1),
            f"ratio_vs_processes_{counts[0]}": round(base / statistics.median(runs), 2),
            "ideal_ratio": round(ideal, 2),
            "goal_ratio": round(0.8 * ideal, 2),
        }
    return {"parts": len(parts), "part_bytes": part_bytes, "cores": cores, "repeats": args.repeats, "clock": "wall (work spread over processes)",
            "identical_output": len(set(fingerprints.values())) == 1, **rows}
