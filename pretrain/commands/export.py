"""`pretrain export RUN_DIR OUT_DIR`: a training checkpoint -> a self-contained encoder directory."""
from __future__ import annotations

import argparse

HELP = "export a run's checkpoint as safetensors + config.json + tokenizer + target table + model card (+ Hugging Face files)"
DESCRIPTION = """Export a training run (any ZeRO stage or pipeline layout) to a directory that loads
without DeepSpeed or the run directory:

    model.safetensors    weights (fp32 or bf16); its metadata signs config.json
    config.json          resolved config, vocab size, sha256 of every file, transformers keys
    tokenizer.model      SentencePiece model
    targets.safetensors  target table
    README.md            model card (head, data, steps, eval numbers, how to load)
    modeling_softmaxfree.py, tokenizer.json, tokenizer_config.json,
    modules.json, sentence_bert_config.json, 1_Pooling/config.json
                         Hugging Face loading (transformers, sentence-transformers)

Load it with:  model, tokenizer = pretrain.load_encoder(OUT_DIR)
          or:  transformers.AutoModel.from_pretrained(OUT_DIR, trust_remote_code=True)
               sentence_transformers.SentenceTransformer(OUT_DIR, trust_remote_code=True)

Run it from the directory the run was trained in (the run's config holds relative data paths)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="training run directory (holds checkpoints/ and config.resolved.yaml), or one checkpoint directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="export directory to write (created; existing export files are replaced)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the stored weights (default fp32)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step-00000300 (default: the latest)")


def run(args: argparse.Namespace) -> int:
    from pretrain.downstream.export import export_run

    out = export_run(args.run_dir, args.out_dir, dtype=args.dtype, tag=args.tag)
    print(f"exported {args.run_dir} -> {out}  (load with: pretrain.load_encoder({str(out)!r}))")
    return 0
