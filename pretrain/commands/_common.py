"""Arguments shared by the stage commands: a config file and dotted overrides."""
from __future__ import annotations

import argparse

from pretrain.config import DEFAULT_CONFIG, Config, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config_and_overrides",
        nargs="*",
        metavar="[CONFIG.yaml] [KEY=VALUE ...]",
        help=f"YAML config (default {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[1])}) "
        "followed by dotted overrides such as train.lr=3e-4",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    items = list(getattr(args, "config_and_overrides", []) or [])
    path = None
    if items and "=" not in items[0]:
        path = items.pop(0)
    return load_config(path, items)
