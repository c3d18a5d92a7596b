"""`pretrain finetune`: sequence classification on top of an exported encoder."""
from __future__ import annotations

import argparse

from pretrain.commands._common import add_config_arguments, config_from_args

HELP = "fine-tune an exported encoder for text classification (CSV/JSONL text,label); accuracy + macro-F1"
DESCRIPTION = """Fine-tune an exported encoder (mean- or first-token pooled, linear head) on a labelled
CSV or JSONL file, evaluating accuracy and macro-F1 on the validation file after every epoch.
Files, fields and hyper-parameters come from the `finetune` config section, e.g.

    pretrain finetune configs/tiny.yaml finetune.epochs=5 --init runs/tiny/export/continuous --out runs/tiny/finetune/pretrained
    pretrain finetune --from-scratch --init runs/tiny/export/continuous --out runs/tiny/finetune/scratch

--from-scratch builds the same architecture as the export's config.json with random weights (the
baseline that shows what pretraining buys). OUT_DIR receives finetune_report.json (final scores,
per-epoch history, majority-class baseline), the fine-tuned model in the export format plus
classifier.safetensors, config.resolved.yaml, and the MLflow records (tracking section)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--init", required=True, metavar="EXPORT_DIR", help="export directory to start from (`pretrain export`)")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="where to write the report and the fine-tuned model")
    parser.add_argument("--from-scratch", action="store_true", help="same architecture, random weights (overrides finetune.from_scratch)")


def run(args: argparse.Namespace) -> int:
    from pretrain.downstream.finetune import REPORT_FILE, finetune

    cfg = config_from_args(args)
    report = finetune(cfg, args.init, args.out, from_scratch=True if args.from_scratch else None)
    base = report["majority_baseline"]
    print(
        f"{'scratch' if report['from_scratch'] else 'pretrained'}: accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f} "
        f"(majority baseline {base['accuracy']:.4f}); report: {args.out}/{REPORT_FILE}"
    )
    return 0
