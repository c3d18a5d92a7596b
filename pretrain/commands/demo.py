"""`pretrain demo`: the whole pipeline on the embedded corpus, with a summary table at the end.

prepare -> targets -> train the continuous head (2 processes, ZeRO) -> train the softmax head on the
same budget -> eval both (FAISS decoding / argmax) -> export -> fine-tune (pretrained vs scratch).
Every stage runs as its own `pretrain` process, exactly as a user would type it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pretrain.commands._common import add_config_arguments, config_from_args

HELP = "run the whole pipeline on the embedded demo corpus and print a summary"
DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--nproc", type=int, default=2, help="training processes per head (DeepSpeed ZeRO over gloo on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per head (default: train.steps)")


class _Stages:
    """Runs stages as subprocesses, timing each one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, argv: list[str]) -> None:
        print(f"\n=== [{len(self.seconds) + 1}] {name}: {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        result = subprocess.run(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.seconds[name] = time.perf_counter() - t0
        if result.returncode != 0:
            raise SystemExit(f"demo: stage '{name}' failed with exit code {result.returncode}; its output is above")
        print(f"=== {name} done in {self.seconds[name]:.1f} s", flush=True)


def _last_metrics(run_dir: Path) -> dict:
    """Average throughput and peak memory over the logged steps of a training run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = rows[len(rows) // 5 :] or rows  # leave out warm-up steps
    tps = [r["tokens_per_s"] for r in steady if "tokens_per_s" in r]
    mem = [r.get("peak_mem_mb", 0.0) for r in rows]
    return {
        "tokens_per_s": sum(tps) / max(len(tps), 1),
        "peak_mem_mb": max(mem) if mem else 0.0,
        "final_loss": rows[-1].get("loss") if rows else None,
        "steps": rows[-1].get("step") if rows else 0,
    }


def collect_summary(runs: dict[str, Path], finetune_dir: Path, stage_seconds: dict[str, float], total_s: float) -> dict:
    """Accuracy, throughput, memory and time of both heads, and the two fine-tuning reports."""
    summary = {"stages_s": {k: round(v, 1) for k, v in stage_seconds.items()}, "total_s": round(total_s, 1), "heads": {},
               "run_dirs": {head: str(run_dir) for head, run_dir in runs.items()}}
    for head, run_dir in runs.items():
        report = json.loads((run_dir / "eval" / "report.json").read_text())
        summary["heads"][head] = {**_last_metrics(run_dir), "top1": report.get("top1"), "top5": report.get("top5"),
                                  "train_s": round(stage_seconds[f"train {head}"], 1)}
        summary["majority_top1"] = report.get("majority_top1")
    cont, soft = summary["heads"]["continuous"], summary["heads"]["softmax"]
    summary["tokens_per_s_ratio"] = cont["tokens_per_s"] / max(soft["tokens_per_s"], 1e-9)
    for which in ("pretrained", "scratch"):
        summary[f"finetune_{which}"] = json.loads((finetune_dir / which / "finetune_report.json").read_text())
    return summary


def _fresh_outputs(workdir: Path, run_dirs: list[Path]) -> None:
    """A rerun starts clean: the training runs would otherwise resume, against a rebuilt target table."""
    stale = [p for p in (*run_dirs, workdir / "export", workdir / "finetune") if p.exists()]
    for path in stale:
        shutil.rmtree(path)
    if stale:
        print(f"demo: removed the previous demo's outputs: {', '.join(map(str, stale))}", flush=True)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    overrides = [a for a in (args.config_and_overrides or []) if "=" in a]
    config_path = next((a for a in (args.config_and_overrides or []) if "=" not in a), None)
    base = [config_path] if config_path else []
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    me = [sys.executable, "-m", "pretrain"]
    launch = me + ["launch", f"--nproc-per-node={args.nproc}"]  # one host: the rendezvous store on 127.0.0.1
    stage = _Stages()
    t_start = time.perf_counter()

    run_root = Path(cfg.train.run_dir) if cfg.train.run_dir else Path(cfg.workdir) / "runs"
    runs = {head: run_root / head for head in ("continuous", "softmax")}
    _fresh_outputs(Path(cfg.workdir), list(runs.values()))

    stage("prepare", me + ["prepare", *base, *overrides])
    stage("targets", me + ["targets", *base, *overrides])
    for head in ("continuous", "softmax"):
        head_overrides = overrides + [f"model.head={head}", f"train.run_name={head}"]
        if cfg.train.run_dir:
            head_overrides.append(f"train.run_dir={runs[head]}")
        stage(f"train {head}", (launch if args.nproc > 1 else me) + ["train", *base, *head_overrides])
        stage(f"eval {head}", me + ["eval", *base, *head_overrides, "--run-dir", str(runs[head])])
    export_dir = Path(cfg.workdir) / "export" / "continuous"
    stage("export", me + ["export", str(runs["continuous"]), str(export_dir)])
    ft_dir = Path(cfg.workdir) / "finetune"
    # The scarce-label setting (100 rows per class of the shipped set), where pretraining pays off.
    ft_overrides = ["finetune.max_train_examples=400", *overrides]  # the user's own overrides win
    stage("finetune pretrained", me + ["finetune", *base, *ft_overrides, "--init", str(export_dir), "--out", str(ft_dir / "pretrained")])
    stage("finetune scratch", me + ["finetune", *base, *ft_overrides, "--from-scratch", "--init", str(export_dir), "--out", str(ft_dir / "scratch")])

    summary = collect_summary(runs, ft_dir, stage.seconds, time.perf_counter() - t_start)
    _print_summary(summary, cfg)
    out = Path(cfg.workdir) / "demo_summary.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"\nsummary written to {out}")
    return 0


def _print_summary(summary: dict, cfg) -> None:
    cont, soft = summary["heads"]["continuous"], summary["heads"]["softmax"]
    print("\n" + "=" * 78)
    print(f"{'head':<12}{'top-1':>8}{'top-5':>8}{'tokens/s':>12}{'peak MB':>10}{'train s':>10}{'final loss':>12}")
    for name, h in (("continuous", cont), ("softmax", soft)):
        print(f"{name:<12}{h['top1']:>8.3f}{h['top5']:>8.3f}{h['tokens_per_s']:>12.0f}{h['peak_mem_mb']:>10.0f}{h['train_s']:>10.1f}{h['final_loss']:>12.4f}")
    ratio = summary["tokens_per_s_ratio"]
    print(f"continuous / softmax tokens/s: {ratio:.2f}x  (vocab {cfg.tokenizer.vocab_size}, D={cfg.targets.dim}); "
          f"always-the-most-frequent-piece top-1: {summary.get('majority_top1') or 0:.3f}")
    pre, scr = summary["finetune_pretrained"], summary["finetune_scratch"]
    print(f"fine-tune accuracy ({pre['train_rows']} labelled rows): pretrained {pre['accuracy']:.3f} (macro-F1 {pre['macro_f1']:.3f}) "
          f"vs scratch {scr['accuracy']:.3f} (macro-F1 {scr['macro_f1']:.3f}); majority class {pre['majority_baseline']['accuracy']:.3f}")
    print(f"total {summary['total_s']:.0f} s; stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in summary["stages_s"].items()))
    runs_root = os.path.commonpath(list(summary["run_dirs"].values()))
    print(f"MLflow: pretrain ui {runs_root}   (both runs; or: mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db)")
    print("=" * 78)
