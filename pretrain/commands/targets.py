"""`pretrain targets`: build the target table the continuous head predicts into."""
from __future__ import annotations

import argparse

from pretrain.commands._common import add_config_arguments, config_from_args

HELP = "build the target embedding table (trained on the shards, imported, or random) with diagnostics"
DESCRIPTION = """Build the V x D unit-normalised target table for the prepared dataset (data.dir).

  targets.method=trained   skip-gram / fastText (targets.algorithm) over the SentencePiece pieces
                           of the training shards, with gensim on all cores
  targets.method=imported  word2vec / fastText vectors (targets.import_path, targets.import_binary)
                           aligned to the pieces ("▁the" -> "the"), with a coverage report
  targets.method=random    seeded random unit vectors (a baseline)

Ids without a vector (special tokens, byte pieces, pieces that never occur) get a vector by n-gram
composition (fastText) or a fixed random unit vector; the report counts each case.
Writes <workdir>/targets/targets.safetensors (or targets.path), report.json (diagnostics: effective
rank, mean pairwise cosine, self-retrieval, duplicates, neighbours of frequent pieces) and the
resolved config next to it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pretrain.targets.build import REPORT_NAME, build_targets, format_summary

    cfg = config_from_args(args)
    report = build_targets(cfg, progress=not args.no_progress)
    print(format_summary(report))
    print(f"report: {cfg.targets_path.parent / REPORT_NAME}")
    return 0
