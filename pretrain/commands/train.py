"""`pretrain train`: train the encoder with DeepSpeed (ZeRO 0-3, optional pipeline stages)."""
from __future__ import annotations

import argparse

from pretrain.commands._common import add_config_arguments, config_from_args

HELP = "train the model (DeepSpeed ZeRO / pipeline; any launcher: none, pretrain launch, torchrun, deepspeed, srun)"
DESCRIPTION = """Train the encoder with the continuous or the softmax head on the prepared shards.

Launch with one process, or with several:
  pretrain train configs/tiny.yaml
  pretrain launch --nproc-per-node 2 train configs/tiny.yaml       (one host; store on 127.0.0.1)
  torchrun --nnodes 2 ... -m pretrain train configs/base.yaml      (several nodes)
  deepspeed --num_gpus 2 --module pretrain train configs/tiny.yaml (on CPU too: --num_gpus = processes)
  srun python -m pretrain train configs/base.yaml                  (one task per GPU)

Everything goes to one run directory (train.run_dir, default <workdir>/runs/<train.run_name>):
config.resolved.yaml, metrics.jsonl, train.log, checkpoints/. Running the same command again with
the same run directory resumes from its latest checkpoint. SIGTERM or SIGUSR1 make every rank save
a checkpoint at the same step and exit with status 99 (srun and pretrain launch show it; torchrun
reports a failed worker); NaN/inf steps are skipped, and the run stops with status 3 (and a
checkpoint) after train.max_bad_steps_in_row of them in a row."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="require a checkpoint in the run directory to resume from (the default resumes "
                             "when there is one and starts afresh otherwise)")


def run(args: argparse.Namespace) -> int:
    from pretrain.engine.trainer import Trainer

    cfg = config_from_args(args)
    return Trainer(cfg, resume="require" if args.resume else "auto").run()
