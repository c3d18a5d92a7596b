"""`pretrain finetune`: sequence classification on top of an exported encoder."""
from __future__ import annotations

import argparse

from pretrain.commands._common import add_config_arguments, config_from_args

HELP = "fine-tune an exported encoder for text classification (CSV/JSONL text,label); accuracy + macro-F1"
DESCRIPTION = """Fine-tune an exported encoder (mean- or first-token pooled, linear head) on labelled
CSV/TSV or JSONL rows, evaluating accuracy, macro-F1 and per-label F1 after every epoch, beside the
majority label of the evaluation rows and TF-IDF + logistic regression on the same split. On your data:

    pretrain finetune --init EXPORT_DIR --out OUT_DIR --train news.csv --text-field body --label-field topic
    pretrain finetune --init EXPORT_DIR --out OUT_DIR --train news.csv --valid test.csv --probe

--train without --valid holds out 20% of its rows (stratified by label); every training row is used
unless finetune.max_train_examples says otherwise, and the row counts per split and label are printed.
Texts longer than finetune.max_len tokens are read as sliding windows, pooled (never cut).
--from-scratch: the export's architecture with random weights; with --table-init, its input embeddings
from the export's target table (no pretraining): the baselines that show what pretraining buys.
OUT_DIR receives finetune_report.json, the model in the export format (loads with pretrain.load_encoder
and Hugging Face tools) plus classifier.safetensors, config.resolved.yaml and the MLflow records."""


def _finetune_keys() -> str:
    """Every finetune.* key with its default and the comment above it in pretrain/config.py."""
    import inspect
    import textwrap

    from pretrain.config import FinetuneConfig

    comments, pending = {}, []
    for line in inspect.getsource(FinetuneConfig).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            pending.append(text.lstrip("# "))
        elif ":" in text and not text.startswith(("def ", "@")):
            comments[text.split(":")[0]] = " ".join(pending)
            pending = []
    rows = []
    for name, field in FinetuneConfig.model_fields.items():
        rows.append(f"  finetune.{name}={field.default}")
        rows += textwrap.wrap(comments.get(name, ""), 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "config keys (set as KEY=VALUE after the config file):\n" + "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.epilog = _finetune_keys()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--init", required=True, metavar="EXPORT_DIR", help="export directory to start from (`pretrain export`)")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="where to write the report and the fine-tuned model")
    parser.add_argument("--train", metavar="FILE", help="labelled CSV/TSV/JSONL training file (finetune.train_file)")
    parser.add_argument("--valid", metavar="FILE", help="labelled evaluation file (finetune.valid_file); without it --train holds out --valid-fraction")
    parser.add_argument("--valid-fraction", type=float, metavar="F", help="hold out this fraction of the training rows, per label (default 0.2 with --train and no --valid)")
    parser.add_argument("--text-field", metavar="NAME", help="column / JSON key of the text (finetune.text_field)")
    parser.add_argument("--label-field", metavar="NAME", help="column / JSON key of the label; labels are strings (finetune.label_field)")
    parser.add_argument("--probe", action="store_true", help="frozen encoder, fit only a linear head on its pooled vectors (fast)")
    parser.add_argument("--probe-first", action="store_true", help="LP-FT: fit the head as --probe does, then fine-tune everything from it")
    parser.add_argument("--from-scratch", action="store_true", help="same architecture, random weights (overrides finetune.from_scratch)")
    parser.add_argument("--table-init", action="store_true", help="with --from-scratch: input embeddings from the export's target table")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (finetune.device; auto = CUDA when available)")


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """The flags as finetune.* overrides (after the config's, so they win)."""
    out = []
    if args.train:
        out.append(f"finetune.train_file={args.train}")
        if not args.valid and args.valid_fraction is None:
            out.append("finetune.valid_fraction=0.2")
    if args.valid:
        out += [f"finetune.valid_file={args.valid}", "finetune.valid_fraction=0"]
    if args.valid_fraction is not None:
        out.append(f"finetune.valid_fraction={args.valid_fraction}")
    for flag, key in (("text_field", "text_field"), ("label_field", "label_field"), ("device", "device")):
        if getattr(args, flag):
            out.append(f"finetune.{key}={getattr(args, flag)}")
    out += [f"finetune.{key}=true" for key in ("probe", "probe_first", "table_init") if getattr(args, key)]
    return out


def run(args: argparse.Namespace) -> int:
    from pretrain.downstream.finetune import REPORT_FILE, finetune

    args.config_and_overrides = [*(args.config_and_overrides or []), *_flag_overrides(args)]
    cfg = config_from_args(args)
    report = finetune(cfg, args.init, args.out, from_scratch=True if args.from_scratch else None)
    base, tfidf = report["majority_baseline"], report["tfidf_baseline"]
    rows = report["rows"]
    print(f"rows: train {rows['train']['rows']} {rows['train']['per_label']}, evaluation {rows['valid']['rows']} {rows['valid']['per_label']}")
    print(f"long texts: {report['windows']['policy']}")
    for label, scores in report["per_class"].items():
        print(f"  {label:<20} F1 {scores['f1']:.4f}  precision {scores['precision']:.4f}  recall {scores['recall']:.4f}  ({scores['support']} rows)")
    tfidf_text = f", TF-IDF + logistic regression {tfidf['accuracy']:.4f} / {tfidf['macro_f1']:.4f}" if tfidf else ""
    print(
        f"{report['init_kind']} ({report['mode']}): accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f} "
        f"(majority baseline {base['accuracy']:.4f}{tfidf_text}); report: {args.out}/{REPORT_FILE}"
    )
    return 0
