"""`pretrain` command line: one subcommand per stage of the pipeline.

Each stage lives in ``pretrain/commands/<name>.py`` and exposes ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``. A stage appears here only once its module exists, so `pretrain --help`
lists exactly what works.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from pretrain import commands
from pretrain.config import ConfigError

# Pipeline order for --help; modules not listed here are appended alphabetically.
STAGE_ORDER = ["prepare", "targets", "train", "launch", "eval", "export", "finetune", "bench", "ui", "demo"]


def _command_modules() -> list[tuple[str, object]]:
    names = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER), n))
    return [(n, importlib.import_module(f"pretrain.commands.{n}")) for n in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Softmax-free pretraining: predict the target token's embedding, decode by nearest neighbour.",
        epilog="Every stage takes a YAML config (default configs/tiny.yaml) and dotted overrides, "
        "e.g. `pretrain train configs/tiny.yaml train.lr=3e-4`. Run `pretrain STAGE --help` for details.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="STAGE", title="stages")
    for name, module in _command_modules():
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


_ran_distributed = False  # set by main() when it shut a process group down


def main(argv: list[str] | None = None) -> int:
    if not sys.stderr.isatty():
        # Logs (CI, SLURM job files): a progress line every 30 s instead of every step.
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    parser = build_parser()
    # parse_known_args: the `deepspeed` launcher appends --local_rank=N to every process.
    args, unknown = parser.parse_known_args(argv)
    unknown = [u for u in unknown if not u.startswith("--local_rank")]
    # KEY=VALUE overrides may also follow the options (`pretrain eval --run-dir R eval.topk=10`).
    if hasattr(args, "config_and_overrides"):
        late = [u for u in unknown if "=" in u and not u.startswith("-")]
        args.config_and_overrides = list(args.config_and_overrides or []) + late
        unknown = [u for u in unknown if u not in late]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        status = int(args._run(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        # User-facing errors carry their own fix; no traceback from deep inside.
        if args.verbose:
            raise
        print(f"pretrain {args.command}: error: {exc}", file=sys.stderr)
        return 1
    global _ran_distributed
    if "torch.distributed" in sys.modules:  # train / eval may have started a process group
        from pretrain.engine.distributed import shutdown_distributed

        _ran_distributed = shutdown_distributed() or _ran_distributed  # every rank got here normally
    return status


def entry() -> None:
    """`pretrain` and `python -m pretrain`: main(), then the exit.

    After a distributed run everything is written, closed and flushed here, and the process ends
    without interpreter teardown, in which gloo threads that DeepSpeed keeps alive can abort a
    finished rank (exit 134, a failed SLURM task). main() itself never exits: tests call it in-process.
    """
    status = main()
    if _ran_distributed:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
