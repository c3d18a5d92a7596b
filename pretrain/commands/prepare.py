"""`pretrain prepare`: corpus -> SentencePiece tokenizer -> packed WebDataset shards + manifest."""
from __future__ import annotations

import argparse
import json

from pretrain.commands._common import add_config_arguments, config_from_args

HELP = "tokenize the corpus and write train/valid WebDataset shards + manifest"
DESCRIPTION = """Read the corpus (data.corpus: plain text, JSONL or Parquet files, gzip or zstd compressed,
directories, globs), train a SentencePiece tokenizer on a sample of it (or reuse tokenizer.model_path),
tokenize it, pack the tokens into data.seq_len sequences and write train/valid shards and
manifest.json to data.dir (default <workdir>/data).

Documents: in JSONL one per record (field data.text_field), in Parquet one per row (column
data.text_field); in plain text one per non-empty line (data.doc_separator=line) or per blank-line
separated paragraph (blank_line); the default, auto, picks blank_line per file for markdown/rst/tex
and hard-wrapped prose, else line. Records over data.max_record_bytes are split or skipped
(data.oversize), binary files refused. Same corpus and config give byte-identical shards.

examples:
  pretrain prepare                                   # the embedded demo corpus, configs/tiny.yaml
  pretrain prepare configs/tiny.yaml data.corpus='[my/texts/*.jsonl.gz]' data.text_field=content
  pretrain prepare tokenizer.model_path=runs/tiny/data/tokenizer.model data.dir=runs/other/data
  pretrain prepare --eval-only tokenizer.model_path=runs/tiny/data/tokenizer.model data.corpus='[held_out/]' data.dir=runs/heldout"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    parser.add_argument("--step", choices=["all", "tokenizer", "parts", "manifest"], default="all",
                        help="run one step only (multi-node prepare, slurm/prepare.sbatch): tokenizer, then parts in "
                        "every task of an array, then manifest (or --manifest-when-complete in the tasks)")
    parser.add_argument("--task-index", type=int, default=None, help="with --step parts: this task's index (default: the SLURM array task, else 0)")
    parser.add_argument("--task-count", type=int, default=None, help="with --step parts: number of tasks (default: the SLURM array size, else 1)")
    parser.add_argument("--manifest-when-complete", action="store_true", help="with --step parts: the task that finds every part done writes the manifest")
    parser.add_argument("--eval-only", action="store_true", help="held-out corpus: write only a valid split of all of it, with tokenizer.model_path (data.eval_only=true)")


def run(args: argparse.Namespace) -> int:
    from pretrain.data.prepare import REPORT_NAME, prepare_dataset

    cfg = config_from_args(args)
    if args.eval_only:
        cfg.data.eval_only = True
    if args.step != "all":
        return _run_step(cfg, args)
    manifest = prepare_dataset(cfg, progress=not args.no_progress)
    report = json.loads((cfg.data_dir / REPORT_NAME).read_text())
    corpus = manifest["corpus"]
    print(f"data dir:   {cfg.data_dir}")
    print(f"tokenizer:  {cfg.data_dir / manifest['tokenizer_file']} (vocab {manifest['vocab_size']}, {report['tokenizer_seconds']:.1f} s)")
    for split, entry in manifest["splits"].items():
        print(f"{split + ':':<11} {len(entry['shards'])} shards, {entry['samples']} sequences of {manifest['seq_len']}, {entry['tokens']} tokens, {entry['documents']} documents")
    print(f"manifest:   {cfg.data_dir / 'manifest.json'}; config: {cfg.data_dir / 'config.resolved.yaml'}")
    counted = ("utf8_replaced_lines", "utf8_skipped_lines", "jsonl_skipped_records", "parquet_skipped_rows", "oversize_split", "oversize_skipped")
    if any(corpus[key] for key in counted):
        print(
            f"input:      {corpus['utf8_replaced_lines']} lines with invalid UTF-8 repaired, {corpus['utf8_skipped_lines']} skipped; "
            f"{corpus['jsonl_skipped_records']} JSONL records and {corpus['parquet_skipped_rows']} Parquet rows skipped; "
            f"{corpus['oversize_split']} over data.max_record_bytes split, {corpus['oversize_skipped']} skipped (see the warnings above)"
        )
    print(
        f"throughput: {report['encode_mb_per_s']:.2f} MB/s, {report['encode_tokens_per_s']:,.0f} tokens/s "
        f"(tokenize+pack+write {report['encode_seconds']:.1f} s, {report['parts']} parts on {report['processes']} processes; total {report['total_seconds']:.1f} s)"
    )
    return 0


def _run_step(cfg, args: argparse.Namespace) -> int:
    import os

    from pretrain.data.prepare import available_cpus, finish_prepare, prepare_task, prepare_tokenizer, start_prepare

    if args.step == "tokenizer":
        path = prepare_tokenizer(cfg, start_prepare(cfg))
        print(f"tokenizer: {path}")
        return 0
    if args.step == "manifest":
        manifest = finish_prepare(cfg)
        counts = ", ".join(f"{split}: {entry['samples']} sequences" for split, entry in manifest["splits"].items())
        print(f"manifest:  {cfg.data_dir / 'manifest.json'} ({counts})")
        return 0
    env = os.environ
    index = args.task_index if args.task_index is not None else int(env.get("SLURM_ARRAY_TASK_ID", 0)) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    count = args.task_count if args.task_count is not None else int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    processes = cfg.data.num_proc or int(env.get("SLURM_CPUS_PER_TASK", 0)) or available_cpus()
    manifest = prepare_task(cfg, index, count, processes, manifest_when_complete=args.manifest_when_complete)
    print(f"task {index} of {count}: parts done" + (f"; manifest written: {cfg.data_dir / 'manifest.json'}" if manifest else ""))
    return 0
