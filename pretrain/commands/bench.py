"""`pretrain bench SUITE`: benchmarks that print JSON; `all` also writes bench/results.json, a table and plots."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import pkgutil
import sys
import time
from pathlib import Path

import faiss
import torch
from tqdm import tqdm

from pretrain import bench as bench_pkg
from pretrain.bench import report
from pretrain.config import REPO_ROOT

HELP = "benchmarks: data, loss, train, decode, all (JSON with ratios, table, PNG plots) or report"
DESCRIPTION = """Run a benchmark suite and print its results as JSON.

`all` runs every suite with arguments sized for the device (CPU or CUDA; docs/benchmarks.md), writes
the combined JSON (--out), results.md and the PNG plots next to it, and with --track logs them all to
MLflow. `report` rebuilds results.md and the plots from an existing JSON without rerunning anything.

Quote the ratios: they are measured side by side in one run. Absolute times mean something only
on the hardware named in the output."""
log = logging.getLogger(__name__)
NOT_SUITES = {"report"}  # modules of pretrain.bench that are not benchmarks
# Suites with their own subcommand but not part of `bench all` (the quality study trains models: minutes, not seconds).
STANDALONE = {"quality"}
ALL_ORDER = ["data", "loss", "train", "decode"]


def all_suite_args(cuda: bool, cpu_threads: int = 1) -> dict[str, list[str]]:
    """What `bench all` passes each suite. The suites' own defaults already fit the device (loss:
    N >= 1024, H >= 256, D in {64, 512}, every softmax peer) except: loss keeps three representative
    losses (cosine, vmf_practice, margin); train gets the GPU target shape (base encoder, 4 layers,
    N=8192 tokens) on CUDA and reaches 128k on CPU, with the DeepSpeed engine's overhead; on CPU the
    timed suites get cpu_threads (on a shared machine two threads stall at OpenMP barriers whenever
    another job holds a core); the report draws the plots, so the suites do not."""
    threads = [] if cuda or not cpu_threads else ["--threads", str(cpu_threads)]
    loss = ["--losses", "cosine", "vmf_practice", "margin", "--plot", "", *threads]
    if cuda:
        train = ["--config", str(REPO_ROOT / "configs" / "base.yaml"), "--vocab-sizes", "32768,131072,262144",
                 "--batch-size", "16", "--seq-len", "512", "--engine", "model.n_layers=4"]
    else:
        train = ["--vocab-sizes", "4096,16384,65536,131072", "--engine", *threads]
    return {"data": [], "loss": loss, "train": train, "decode": ["--plot", "", *threads]}


def _suites() -> dict[str, object]:
    names = [m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if not m.name.startswith("_") and m.name not in NOT_SUITES | STANDALONE]
    names.sort(key=lambda n: (ALL_ORDER.index(n) if n in ALL_ORDER else len(ALL_ORDER), n))
    return {n: importlib.import_module(f"pretrain.bench.{n}") for n in names}


def _add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--track", action="store_true", help="log the results (metrics, params) and the JSON, table and plots "
                        "(artifacts) to MLflow, one new run each time")
    parser.add_argument("--tracking-uri", default=None, help="MLflow server, e.g. http://127.0.0.1:5000 "
                        "(default: a local SQLite store in --store-dir)")
    parser.add_argument("--store-dir", default="bench/mlruns", help="local MLflow store and run records (`pretrain ui bench/mlruns` opens it)")
    parser.add_argument("--experiment", default="pretrain-bench", help="MLflow experiment name")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="suite", metavar="SUITE", required=True)
    standalone = {n: importlib.import_module(f"pretrain.bench.{n}") for n in sorted(STANDALONE)}
    for name, module in {**_suites(), **standalone}.items():
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_suite=module, _action="suite")
    p_all = sub.add_parser("all", help="every suite; writes --out, results.md and the plots next to it",
                           description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p_all.add_argument("--out", default="bench/results.json", help="combined JSON; results.md and the PNGs go in its folder")
    p_all.add_argument("--suites", nargs="+", default=None, metavar="SUITE", help="only these suites (default: all)")
    p_all.add_argument("--cpu-threads", type=int, default=1, help="torch (and FAISS) threads of the loss, train and decode "
                       "suites on CPU; 1 keeps a shared machine's numbers steady, 0 leaves the libraries' defaults")
    _add_tracking_arguments(p_all)
    p_all.set_defaults(_action="all")
    p_report = sub.add_parser("report", help="results.md and the plots again from an existing results JSON (no rerun)")
    p_report.add_argument("results", nargs="?", default="bench/results.json", help="a JSON written by `pretrain bench all`")
    p_report.add_argument("--out-dir", default=None, help="where results.md and the PNGs go (default: the JSON's folder)")
    _add_tracking_arguments(p_report)
    p_report.set_defaults(_action="report")


def run_suites(suites: dict[str, object], suite_args: dict[str, list[str]]) -> dict:
    """Each suite with its `all` arguments, one after another; a failing suite is recorded, not fatal."""
    results = {"hardware": report.hardware_info(), "suite_args": {}, "suites": {}}
    started = time.perf_counter()
    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    for name, module in (bar := tqdm(suites.items(), desc="bench all", unit="suite")):
        bar.set_postfix_str(name)
        parser = argparse.ArgumentParser(prog=f"pretrain bench {name}")
        module.add_arguments(parser)
        argv = suite_args.get(name, [])
        results["suite_args"][name] = argv
        t0 = time.perf_counter()
        try:
            results["suites"][name] = module.run(parser.parse_args(argv))
        except Exception as exc:  # noqa: BLE001 - the other suites' numbers are still worth having
            log.exception("bench %s failed", name)
            results["suites"][name] = {"suite": name, "error": f"{type(exc).__name__}: {exc}"}
        finally:  # a suite may pin threads (--threads); the next one starts from the defaults
            torch.set_num_threads(threads[0])
            faiss.omp_set_num_threads(threads[1])
        results["suites"][name]["suite_seconds"] = round(time.perf_counter() - t0, 2)
    results["seconds"] = round(time.perf_counter() - started, 1)
    if hasattr(os, "getloadavg"):
        results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def _publish(results: dict, results_path: Path, out_dir: Path, args: argparse.Namespace) -> None:
    """results.md and the plots into out_dir; with --track, all of it to MLflow."""
    try:
        files = [results_path, *report.write_report(results, out_dir)]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{results_path}: a suite's results lack what the report reads ({type(exc).__name__}: {exc}); "
                         "was it written by another version? Rerun `pretrain bench all`") from exc
    for path in files:
        print(f"wrote {path}")
    if args.track:
        run_id, run_dir = report.track(results, files, args.store_dir, tracking_uri=args.tracking_uri, experiment=args.experiment)
        where = args.tracking_uri or f"{args.store_dir} (open it with: pretrain ui {args.store_dir})"
        print(f"MLflow run {run_id} on {where}; run record in {run_dir}")


def run(args: argparse.Namespace) -> int:
    if args._action == "suite":
        # stdout carries the JSON alone: libraries' prints during the run (DeepSpeed logs to stdout) go to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            result = args._suite.run(args)
        result.setdefault("hardware", report.hardware_info())
        print(json.dumps(result, indent=2))
        return 0
    if args._action == "report":
        results = report.load_results(args.results)
        _publish(results, Path(args.results), Path(args.out_dir or Path(args.results).parent), args)
        return 0
    suites = _suites()
    unknown = sorted(set(args.suites or []) - set(suites))
    if unknown:
        raise ValueError(f"--suites: unknown {unknown}; choose from {sorted(suites)}")
    chosen = {n: m for n, m in suites.items() if args.suites is None or n in args.suites}
    results = run_suites(chosen, all_suite_args(torch.cuda.is_available(), args.cpu_threads))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    _publish(results, out, out.parent, args)
    failed = [n for n, r in results["suites"].items() if "error" in r]
    if failed:
        print(f"failed suites: {', '.join(failed)} (their errors are in {out})")
    return 1 if failed else 0
