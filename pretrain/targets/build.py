"""`pretrain targets` orchestration: dataset -> vectors (trained / imported / random) -> fill -> table + report."""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pretrain.config import Config, TargetsConfig, save_resolved
from pretrain.targets import diagnostics as diag
from pretrain.targets.corpus import piece_tokens, split_documents, write_piece_corpus
from pretrain.targets.fill import PIECE, RANDOM, fill_missing, piece_kinds
from pretrain.targets.imported import coverage, import_vectors
from pretrain.targets.isotropy import all_but_the_top
from pretrain.targets.table import normalize_rows, random_unit_table, save_target_table
from pretrain.targets.trained import train_piece_vectors

log = logging.getLogger(__name__)
REPORT_NAME = "report.json"
# Diagnostics: neighbours printed for this many frequent pieces; context agreement over this many.
SHOW_NEIGHBOURS = 10
CONTEXT_QUERIES = 200
CONTEXT_SAMPLE_TOKENS = 2_000_000
CONTEXT_WINDOW = 2


def make_table(
    tcfg: TargetsConfig,
    pieces: list[str],
    kinds: list[str],
    corpus_file: str | Path | None,
    counts: np.ndarray,
    *,
    progress: bool = True,
) -> tuple[torch.Tensor, dict]:
    """The unit V x D table for the configured method, and the report's method-specific parts."""
    vocab_size, parts = len(pieces), {}
    if tcfg.method == "random":
        vectors, sources, composer = np.zeros((vocab_size, tcfg.dim), np.float32), [None] * vocab_size, None
    elif tcfg.method == "trained":
        trained = train_piece_vectors(corpus_file, pieces, tcfg, progress=progress)
        vectors, sources, composer = trained.vectors, trained.sources, trained.composer
        parts["trainer"] = trained.stats
    else:
        _check_import_settings(tcfg)
        imported = import_vectors(tcfg.import_path, tcfg.import_binary, pieces, kinds, tcfg.dim)
        vectors, sources, composer = imported.vectors, imported.sources, imported.composer
        parts["import"] = {**imported.stats, "file": str(tcfg.import_path), **coverage(imported.sources, counts)}
    filled = fill_missing(vectors, sources, pieces, kinds, seed=tcfg.seed, composer=composer)
    parts["fill"] = filled.counts
    if tcfg.method == "random" or tcfg.remove_top_components < 0:
        return normalize_rows(filled.table), parts
    # The fixed random fallback rows are isotropic already: only rows with real vectors are centred.
    real_rows = torch.tensor([src != RANDOM for src in filled.sources])
    parts["isotropy"] = {"method": "all-but-the-top", "components_removed": tcfg.remove_top_components, "rows": int(real_rows.sum())}
    return all_but_the_top(filled.table, tcfg.remove_top_components, real_rows), parts


def _check_import_settings(tcfg: TargetsConfig) -> None:
    if tcfg.method != "imported":
        return
    if not tcfg.import_path:
        raise ValueError("targets.method=imported needs targets.import_path (a word2vec/fastText .vec/.txt/.bin file)")
    if not Path(tcfg.import_path).is_file():
        raise FileNotFoundError(f"targets.import_path {tcfg.import_path} not found (a word2vec/fastText .vec/.txt/.bin file)")


def build_targets(cfg: Config, *, progress: bool = True) -> dict:
    """Build cfg.targets_path for the prepared dataset in cfg.data_dir; returns the report (also saved)."""
    from pretrain.data.manifest import check_tokenizer, load_manifest, manifest_sha256
    from pretrain.data.stream import iter_samples
    from pretrain.data.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    tcfg, data_dir = cfg.targets, Path(cfg.data_dir)
    _check_import_settings(tcfg)  # before the (long) pass over the shards
    manifest = load_manifest(data_dir)
    sp = load_tokenizer(check_tokenizer(data_dir, manifest))
    tokenizer_sha = manifest["tokenizer_sha256"]
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    kinds = piece_kinds(sp)
    special = manifest["special_ids"]
    drop_ids = [i for name, i in special.items() if name not in ("unk", "eos")]  # pad, bos, mask
    skipped_shards: list[dict] = []  # data.on_corrupt_shard=skip: counted in the report
    samples = iter_samples(data_dir, "train", on_corrupt_shard=cfg.data.on_corrupt_shard, skipped=skipped_shards, shards_url=cfg.data.shards_url)
    documents = split_documents(samples, special["eos"], drop_ids)
    out_dir = Path(cfg.targets_path).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    # The piece corpus is only needed while training: a temporary file next to the output.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".corpus-") as tmp:
        corpus_file = Path(tmp) / "pieces.txt" if tcfg.method == "trained" else None
        counts, sample_docs = write_piece_corpus(
            documents, corpus_file, piece_tokens(pieces), keep_tokens=CONTEXT_SAMPLE_TOKENS,
            total_tokens=manifest["splits"].get("train", {}).get("tokens"), progress=progress,
        )
        if counts.sum() == 0:
            raise ValueError(f"the train split of {data_dir} holds no tokens: rerun `pretrain prepare` with a non-empty corpus")
        table, parts = make_table(tcfg, pieces, kinds, corpus_file, counts, progress=progress)

    meta = {
        "tokenizer_sha256": tokenizer_sha,
        "manifest_sha256": manifest_sha256(data_dir),
        "method": tcfg.method,
        "algorithm": tcfg.algorithm if tcfg.method == "trained" else "",
        "seed": tcfg.seed,
    }
    out_path = save_target_table(cfg.targets_path, table, meta)
    report = {"table": str(out_path), **meta, "vocab_size": len(pieces), "dim": tcfg.dim, **parts}
    report["skipped_shards"] = {"shards": len(skipped_shards), "samples": sum(e["samples"] for e in skipped_shards), "entries": skipped_shards}
    report["diagnostics"] = diagnose(table, pieces, kinds, counts, sample_docs, seed=tcfg.seed)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    save_resolved(cfg, out_dir)
    if report["diagnostics"]["duplicates"]:
        log.warning("%d ids are not their own nearest row: they cannot be decoded (see %s)", report["diagnostics"]["duplicates"], out_dir / REPORT_NAME)
    return report


def diagnose(table: torch.Tensor, pieces: list[str], kinds: list[str], counts: np.ndarray, sample_docs: list[np.ndarray], *, seed: int = 0) -> dict:
    """Table diagnostics plus neighbours / context agreement of the most frequent ordinary pieces."""
    order = [int(i) for i in np.argsort(-counts, kind="stable") if kinds[i] == PIECE and counts[i] > 0]
    report = diag.table_report(table, pieces=pieces, frequent_ids=order[:SHOW_NEIGHBOURS])
    queries = order[:CONTEXT_QUERIES]
    if len(queries) >= 2:
        ppmi = diag.ppmi_cooccurrence(sample_docs, len(pieces), window=CONTEXT_WINDOW)
        report["context_agreement"] = diag.context_agreement(table, ppmi, queries, seed=seed)
        baseline = random_unit_table(*table.shape, seed=seed + 1)
        report["context_agreement"]["random_table_margin"] = diag.context_agreement(baseline, ppmi, queries, seed=seed)["margin"]
    return report


def format_summary(report: dict) -> str:
    lines = [f"target table {report['table']}: method {report['method']}, {report['vocab_size']} x {report['dim']}"]
    skipped = report.get("skipped_shards", {})
    if skipped.get("shards"):
        lines.append(f"skipped {skipped['shards']} corrupt train shard(s), {skipped['samples']} samples (data.on_corrupt_shard=skip)")
    if "trainer" in report:
        t = report["trainer"]
        lines.append(f"trainer: {t['algorithm']}, {t['corpus_tokens']} tokens x {t['epochs']} epochs in {t['train_seconds']:.1f} s = {t['tokens_per_s']:.0f} tokens/s ({t['workers']} threads)")
    if "import" in report:
        imp = report["import"]
        lines.append(f"import: {imp['file']} ({imp['file_words']} words): {imp['ids_covered']}/{imp['ids_total']} ids covered"
                     + (f", {imp['token_coverage']:.1%} of corpus tokens" if "token_coverage" in imp else ""))
    by_kind = report["fill"]["by_kind"]
    lines.append("vectors by source: " + ", ".join(f"{k} {v}" for k, v in sorted(report["fill"]["by_source"].items())))
    lines.append("  by kind: " + "; ".join(f"{kind}: " + ", ".join(f"{s} {n}" for s, n in sorted(c.items())) for kind, c in by_kind.items() if c))
    lines.append(diag.format_report(report["diagnostics"]))
    ca = report["diagnostics"].get("context_agreement")
    if ca:
        lines.append(f"context agreement over {ca['queries']} frequent pieces: neighbour {ca['neighbour_context_cosine']:.3f} vs random pair "
                     f"{ca['random_context_cosine']:.3f} (margin {ca['margin']:+.3f}; a random table gives {ca['random_table_margin']:+.3f})")
    return "\n".join(lines)
