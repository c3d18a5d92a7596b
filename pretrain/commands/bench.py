"""`pretrain bench SUITE`: benchmarks that print JSON (and write bench/results.json, plots)."""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import time
from pathlib import Path

from pretrain import bench as bench_pkg

HELP = "benchmarks: data, loss, train, decode, or all (JSON with ratios; PNG plots)"
DESCRIPTION = """Run a benchmark suite and print its results as JSON.

Quote the ratios: they are measured side by side in one run. Absolute times mean something only
on the hardware named in the output."""


def _suites() -> dict[str, object]:
    names = sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if not m.name.startswith("_"))
    return {n: importlib.import_module(f"pretrain.bench.{n}") for n in names}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench/results.json", help="where `all` writes the combined JSON")
    sub = parser.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, module in _suites().items():
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_suite=module)
    p_all = sub.add_parser("all", help="every suite with its defaults; writes --out and the plots")
    p_all.set_defaults(_suite=None)


def _hardware() -> dict:
    import platform

    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": __import__("os").cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(args: argparse.Namespace) -> int:
    if args._suite is not None:
        result = args._suite.run(args)
        result.setdefault("hardware", _hardware())
        print(json.dumps(result, indent=2))
        return 0
    results = {"hardware": _hardware(), "suites": {}}
    for name, module in _suites().items():
        p = argparse.ArgumentParser()
        module.add_arguments(p)
        t0 = time.perf_counter()
        results["suites"][name] = module.run(p.parse_args([]))
        results["suites"][name]["suite_seconds"] = round(time.perf_counter() - t0, 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0
