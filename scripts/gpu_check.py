"""`make gpu-check`: one command for the first GPU machine that runs this project (≤ 8 min on one GPU).

    python scripts/gpu_check.py [--out gpu-check] [--cpu-smoke]

Runs five parts and writes OUT/gpu_check.json (every figure) and OUT/gpu_check.md (a readable summary):

  kernels    the Triton kernels against a float64 truth on the device (pretrain_kernels.checks), every
             loss in fp32 and bf16, and the margin's negative search (bf16 `tl.dot` on a GPU)
  bench_loss `pretrain bench loss` at V ∈ {32k, 128k, 256k}, N=8192, H=1024, D=512, bf16: continuous heads
             vs F.cross_entropy over full logits and, where installed (the `bench` extra, CUDA only), the
             fused cross-entropy kernels of Liger-Kernel and Cut Cross-Entropy; time and peak memory
  bandwidth  the pointwise loss kernel's achieved bandwidth (bytes moved / time) against the device's
             peak, and its speed against the PyTorch reference (interleaved rounds, median [min, max])
  decode     `pretrain bench decode`: FAISS flat search (CPU, GPU, sharded over every visible GPU) vs
             torch matmul + top-k
  train      50 bf16 training steps of the configs/base.yaml encoder, continuous vs softmax head:
             tokens/s and peak memory

--cpu-smoke runs every part end to end on tiny shapes on the CPU (Triton's interpreter for the kernels),
so that CI proves the script does not rot; its figures say nothing about speed. A part that fails is
reported with its error and the others still run; the exit status is 1 if any part failed.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FUSED_CE_ROWS = ("liger", "cce")  # their row names in `pretrain bench loss`
FUSED_CE_PEERS = {"liger_kernel": "Liger-Kernel fused linear cross-entropy", "cut_cross_entropy": "Apple Cut Cross-Entropy"}

# Shapes per mode: the target shapes on a GPU, tiny ones for the CPU smoke run.
SHAPES = {
    "gpu": {
        "kernels": {"n": 1000, "d": 512, "v": 5000, "reductions": ["mean", "none"]},
        "bench_loss": ["--vocab-sizes", "32768", "131072", "262144", "--tokens", "8192", "--hidden", "1024",
                       "--dim", "512", "--dtype", "bf16", "--losses", "cosine", "vmf_practice", "syn_margin_orth",
                       "--chunk-size", "2048", "--repeats", "5"],
        "bandwidth": {"n": 65536, "d": 512, "v": 32768, "dtype": "bf16", "repeats": 7},
        "decode": ["--vocab-sizes", "32768", "131072", "262144", "--dim", "512", "--queries", "2048", "--repeats", "3"],
        "train": {"config": "configs/base.yaml", "vocab": 32000, "batch": 8, "seq_len": 512, "steps": 50, "warmup": 3,
                  "overrides": []},
    },
    "cpu-smoke": {
        "kernels": {"n": 23, "d": 40, "v": 37, "reductions": ["mean"]},
        "bench_loss": ["--vocab-sizes", "256", "512", "--tokens", "32", "--hidden", "16", "--dim", "8",
                       "--dtype", "fp32", "--losses", "cosine", "vmf_practice", "--chunk-size", "16", "--repeats", "5",
                       "--threads", "1"],
        "bandwidth": {"n": 64, "d": 32, "v": 50, "dtype": "fp32", "repeats": 5},
        "decode": ["--vocab-sizes", "256", "--dim", "8", "--queries", "32", "--repeats", "5", "--threads", "1"],
        "train": {"config": "configs/tiny.yaml", "vocab": 300, "batch": 2, "seq_len": 16, "steps": 5, "warmup": 1,
                  "overrides": ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
                                "model.max_seq_len=16", "targets.dim=16", "loss.chunk_size=16"]},
    },
}


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------

def part_kernels(mode: str, device) -> dict:
    import torch

    from pretrain_kernels import LOSS_NAMES, checks

    shape = SHAPES[mode]["kernels"]
    results, failures = [], []
    for dtype in (torch.float32, torch.bfloat16):
        for kind in LOSS_NAMES:
            pred, ids, table = checks.make_case(shape["n"], shape["d"], shape["v"], dtype, seed=1, device=device)
            for reduction in shape["reductions"]:
                for name, ok, message in checks.compare_with_truth(kind, pred, ids, table, reduction):
                    row = {"kind": kind, "dtype": str(dtype).removeprefix("torch."), "reduction": reduction,
                           "output": name, "ok": ok, "detail": message}
                    results.append(row)
                    if not ok:
                        failures.append(row)
        # Strided inputs (a column-sliced pred was an out-of-bounds write: an illegal access on a GPU).
        pred, ids, table = checks.make_case(shape["n"], shape["d"], shape["v"], dtype, seed=3, device=device)
        for kind in ("cosine", "margin"):
            for layout, ok, message in checks.strided_layouts_match(kind, pred, ids, table):
                row = {"kind": kind, "dtype": str(dtype).removeprefix("torch."), "reduction": "none",
                       "output": f"strided: {layout}", "ok": ok, "detail": message}
                results.append(row)
                if not ok:
                    failures.append(row)
        # The margin's tiled search: bf16 tables use the bf16 tl.dot on a GPU (never run elsewhere).
        pred, ids, table = checks.make_case(shape["n"], shape["d"], shape["v"], dtype, seed=2, device=device)
        slack = 1e-6 if dtype == torch.float32 else 2e-2
        ok, message = checks.search_is_near_best(pred, ids, table, slack)
        row = {"kind": "margin search", "dtype": str(dtype).removeprefix("torch."), "reduction": "-",
               "output": "negative ids", "ok": ok, "detail": message}
        results.append(row)
        if not ok:
            failures.append(row)
    return {"status": "ok" if not failures else "failed", "checks": len(results), "passed": len(results) - len(failures),
            "failures": failures, "results": results, "shape": shape}


def _suite(name: str, argv: list[str], plot: bool = True) -> dict:
    """Run a `pretrain bench` suite in this process with its own argument parser (its defaults apply
    to every option not given here, including ones added later)."""
    module = importlib.import_module(f"pretrain.bench.{name}")
    parser = argparse.ArgumentParser(prog=f"pretrain bench {name}")
    module.add_arguments(parser)
    return module.run(parser.parse_args([*argv, "--plot", ""] if plot else argv))


def _peer_status(cuda: bool) -> dict:
    status = {}
    for module, label in FUSED_CE_PEERS.items():
        if importlib.util.find_spec(module) is None:
            status[module] = f"{label}: not installed (pip install -e '.[bench]'; it needs CUDA)"
        elif not cuda:
            status[module] = f"{label}: installed, needs CUDA (not run)"
        else:
            status[module] = f"{label}: installed"
    return status


def part_bench_loss(mode: str, cuda: bool) -> dict:
    bench = _suite("loss", SHAPES[mode]["bench_loss"])
    vocabs = sorted(bench["results"], key=int)
    # Timed rows only (a peer that could not run may carry a status instead of a time).
    timed = {
        vocab: {name: row for name, row in bench["results"][vocab].items() if isinstance(row, dict) and isinstance(row.get("ms"), (int, float))}
        for vocab in vocabs
    }
    summary = {vocab: {name: {"ms": row["ms"], "peak_mib": row.get("peak_mib")} for name, row in rows.items()} for vocab, rows in timed.items()}
    targets = _loss_targets(timed[vocabs[-1]], timed, vocabs)
    return {"status": "ok", "summary": summary, "peers": _peer_status(cuda), "targets": targets, "bench": bench}


def _loss_targets(largest: dict, results: dict, vocabs: list[str]) -> dict:
    """The issue's targets at the largest V: continuous ≥ 100× faster than softmax CE, ≥ 30× faster
    than the fused CE kernels, peak memory flat in V (largest V within 1.5× the smallest)."""
    continuous = {n: r for n, r in largest.items() if _is_continuous(n)}
    peers = {n: r for n, r in largest.items() if n in FUSED_CE_ROWS}
    best = min(continuous.items(), key=lambda item: item[1]["ms"])
    out = {"vocab": int(vocabs[-1]), "fastest_continuous": best[0], "fastest_continuous_ms": best[1]["ms"],
           "speedup_vs_softmax": round(largest["softmax"]["ms"] / best[1]["ms"], 2), "speedup_vs_softmax_target": 100}
    out["speedup_vs_softmax_met"] = out["speedup_vs_softmax"] >= 100
    for name in ("softmax_chunked", "adaptive_softmax"):  # the torch peers, measured everywhere
        if name in largest:
            out[f"speedup_vs_{name}"] = round(largest[name]["ms"] / best[1]["ms"], 2)
    if peers:
        fastest_peer = min(peers.items(), key=lambda item: item[1]["ms"])
        out["fastest_fused_ce"] = fastest_peer[0]
        out["speedup_vs_fused_ce"] = round(fastest_peer[1]["ms"] / best[1]["ms"], 2)
        out["speedup_vs_fused_ce_met"] = out["speedup_vs_fused_ce"] >= 30
    else:
        out["speedup_vs_fused_ce"] = "not measured: no fused cross-entropy peer ran (see peers)"
    first, last = results[vocabs[0]][best[0]].get("peak_mib"), results[vocabs[-1]][best[0]].get("peak_mib")
    if first and last:
        out["memory_growth_smallest_to_largest_v"] = round(last / first, 3)
        out["memory_flat_in_v_met"] = last <= 1.5 * first
    return out


def _is_continuous(name: str) -> bool:
    from pretrain_kernels import LOSS_NAMES

    return name.split()[0].split("+")[0] in LOSS_NAMES  # rows are named like "cosine+fused D512"


def part_bandwidth(mode: str, device) -> dict:
    """Pointwise loss kernel (forward + dL/dpred in one launch) vs the PyTorch reference (autograd),
    timed in interleaved rounds; process CPU time on the CPU, CUDA events on a GPU."""
    import torch
    import torch.nn.functional as F

    from pretrain.bench._timing import clock_name
    from pretrain.bench.loss import peak_bandwidth_bytes_per_s
    from pretrain_kernels import LossParams, continuous_loss
    from pretrain_kernels.pointwise import loss_rows_and_grads

    shape = SHAPES[mode]["bandwidth"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[shape["dtype"]]
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(shape["n"], shape["d"], generator=gen).to(device, dtype)
    table = F.normalize(torch.randn(shape["v"], shape["d"], generator=gen), dim=-1).to(device, dtype)
    ids = torch.randint(0, shape["v"], (shape["n"],), generator=gen).to(device)
    scale = torch.full((), 1.0 / shape["n"], device=device)
    peak = peak_bandwidth_bytes_per_s(device)
    # Minimum traffic of the launch: read p and E[y], write dL/dp (N×D each), ids and loss rows.
    moved = 3 * pred.numel() * pred.element_size() + shape["n"] * 12
    out = {"shape": shape, "bytes_moved": moved, "peak_bandwidth_gb_s": None if peak is None else round(peak / 1e9, 1),
           "clock": clock_name(device), "losses": {}}
    for kind in ("cosine", "vmf_practice"):
        def kernel_step():
            loss_rows_and_grads(pred, ids, table, kind, LossParams(), -100, scale, want_pred_grad=True)

        def reference_step():
            p = pred.detach().requires_grad_(True)
            continuous_loss(p, ids, table, kind, impl="reference").backward()

        times = _interleaved({"kernel": kernel_step, "reference": reference_step}, shape["repeats"], device)
        kernel_s = times["kernel"]["median_s"]
        row = {name: {"median_ms": round(t["median_s"] * 1e3, 4),
                      "min_max_ms": [round(t["min_s"] * 1e3, 4), round(t["max_s"] * 1e3, 4)]} for name, t in times.items()}
        row["speedup_vs_reference"] = round(times["reference"]["median_s"] / kernel_s, 2)
        row["speedup_target"] = 2.0
        row["achieved_gb_s"] = round(moved / kernel_s / 1e9, 3)
        if peak:
            row["ideal_ms_at_peak_bandwidth"] = round(moved / peak * 1e3, 4)
            row["fraction_of_peak_bandwidth"] = round(moved / kernel_s / peak, 3)
            row["fraction_target"] = 0.8
        out["losses"][kind] = row
    out["status"] = "ok"
    return out


def _interleaved(steps: dict, repeats: int, device) -> dict:
    """Median, min and max seconds per step, timed as every `pretrain bench` suite times them
    (pretrain/bench/_timing.py: interleaved rotating rounds after a warm-up; process CPU time on the
    CPU, CUDA events on a GPU)."""
    from pretrain.bench._timing import interleaved_seconds

    samples = interleaved_seconds(steps, repeats, device)
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s)} for name, s in samples.items()}


def part_decode(mode: str) -> dict:
    import torch

    bench = _suite("decode", SHAPES[mode]["decode"])
    gpus = torch.cuda.device_count()
    sharded = "measured" if bench.get("faiss_gpus", 0) > 1 else f"not run: needs ≥ 2 GPUs visible to FAISS ({bench.get('faiss_gpus', 0)})"
    summary = {str(r["vocab_size"]): {name: m["vectors_per_s"] for name, m in r["methods"].items()} for r in bench["results"]}
    return {"status": "ok", "visible_gpus": gpus, "sharded": sharded, "vectors_per_s": summary, "bench": bench}


def part_train(mode: str, device) -> dict:
    """`pretrain bench train` (heads interleaved step by step) under bf16 autocast: tokens/s, phases, ratios."""
    import torch

    shape = SHAPES[mode]["train"]
    argv = ["--config", str(REPO_ROOT / shape["config"]), "--vocab-sizes", str(shape["vocab"]), "--objective", "masked",
            "--batch-size", str(shape["batch"]), "--seq-len", str(shape["seq_len"]), "--repeats", str(shape["steps"]),
            "--warmup", str(shape["warmup"]), "--optimizer", "fused", "--device", device.type,
            "--heads", "continuous_fused,continuous,softmax", *shape["overrides"]]
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        bench = _suite("train", argv, plot=False)
    row = bench["results"][0]
    heads = {h: row[h] for h in ("continuous_fused", "continuous", "softmax")}
    if device.type == "cuda":  # peak memory per head: each alone (interleaved, the peaks would mix)
        for head in heads:
            torch.cuda.reset_peak_memory_stats(device)
            alone = [*argv, "--heads", head, "--repeats", "5", "--warmup", "1"]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                _suite("train", alone, plot=False)
            heads[head]["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    softmax = heads["softmax"]["tokens_per_s"]
    return {"status": "ok", "shape": shape, "dtype": "bf16 (torch.autocast)", "model": bench["model"], "heads": heads,
            "tokens_per_s_over_softmax": {h: round(r["tokens_per_s"] / softmax, 3) for h, r in heads.items() if h != "softmax"},
            "bench": bench}


# --------------------------------------------------------------------------------------------------
# Driver and report
# --------------------------------------------------------------------------------------------------

def environment(device) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    for module in ("triton", "faiss", "deepspeed", *FUSED_CE_PEERS):
        try:
            env[module] = getattr(importlib.import_module(module), "__version__", "installed")
        except Exception as exc:  # noqa: BLE001 - report any import failure as such
            env[module] = f"unavailable ({type(exc).__name__})"
    return env


def run(mode: str, only: list[str] | None = None) -> dict:
    import torch

    device = torch.device("cuda" if mode == "gpu" else "cpu")
    parts = {
        "kernels": lambda: part_kernels(mode, device),
        "bench_loss": lambda: part_bench_loss(mode, device.type == "cuda"),
        "bandwidth": lambda: part_bandwidth(mode, device),
        "decode": lambda: part_decode(mode),
        "train": lambda: part_train(mode, device),
    }
    report = {"mode": mode, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "environment": environment(device), "parts": {}}
    start = time.perf_counter()
    for name, part in parts.items():
        if only and name not in only:
            continue
        print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
        part_start = time.perf_counter()
        try:
            result = part()
        except Exception as exc:  # noqa: BLE001 - one broken part must not hide the others' figures
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - part_start, 2)
        report["parts"][name] = result
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["ok"] = all(p["status"] == "ok" for p in report["parts"].values())
    return report


def summary_markdown(report: dict) -> str:
    env, parts = report["environment"], report["parts"]
    lines = [f"# gpu-check ({report['mode']})", "",
             f"{report['started_utc']}, {report['seconds']} s; torch {env['torch']}, triton {env['triton']}, "
             f"faiss {env['faiss']}; devices: {', '.join(env['cuda_devices']) or 'CPU only'}", ""]
    if report["mode"] == "cpu-smoke":
        lines += ["CPU smoke run: tiny shapes, Triton interpreter. Proves every part runs; the figures are not speeds.", ""]
    for name, part in parts.items():
        lines.append(f"## {name}: {part['status']} ({part['seconds']} s)")
        if part["status"] != "ok" and "error" in part:
            lines.append(f"error: `{part['error']}`")
        elif name == "kernels":
            lines.append(f"{part['passed']}/{part['checks']} checks pass (loss, dL/dpred, dL/dtable of every loss; fp32, bf16)")
            lines += [f"- FAILED {f['kind']} {f['dtype']} {f['reduction']} {f['output']}: {f['detail']}" for f in part["failures"]]
        elif name == "bench_loss":
            lines += ["| V | " + " | ".join(next(iter(part["summary"].values()))) + " |",
                      "|---:|" + "---:|" * len(next(iter(part["summary"].values())))]
            for vocab, rows in part["summary"].items():
                lines.append(f"| {vocab} | " + " | ".join(f"{r['ms']} ms / {r['peak_mib']} MiB" for r in rows.values()) + " |")
            lines.append("")
            lines += [f"- {status}" for status in part["peers"].values()]
            lines.append(f"- targets: `{json.dumps(part['targets'])}`")
        elif name == "bandwidth":
            lines.append(f"peak {part['peak_bandwidth_gb_s']} GB/s, {part['bytes_moved']} bytes per launch, clock: {part['clock']}")
            for kind, row in part["losses"].items():
                lines.append(f"- {kind}: kernel {row['kernel']['median_ms']} ms {row['kernel']['min_max_ms']}, reference "
                             f"{row['reference']['median_ms']} ms {row['reference']['min_max_ms']}, ×{row['speedup_vs_reference']} "
                             f"(target ≥ 2), {row['achieved_gb_s']} GB/s, fraction of peak {row.get('fraction_of_peak_bandwidth', 'n/a')} (target ≥ 0.8)")
        elif name == "decode":
            lines.append(f"visible GPUs {part['visible_gpus']}; sharded: {part['sharded']}")
            for vocab, methods in part["vectors_per_s"].items():
                lines.append(f"- V={vocab}: " + ", ".join(f"{m} {v:.0f}/s" for m, v in methods.items()))
        elif name == "train":
            lines.append(f"model {part['model']}, batch {part['shape']['batch']}×{part['shape']['seq_len']}, "
                         f"{part['shape']['steps']} steps, {part['dtype']}")
            for head, row in part["heads"].items():
                lines.append(f"- {head}: {row['tokens_per_s']} tokens/s, {row['step_ms']} ms/step, peak {row.get('peak_mem_mb', 'n/a')} MiB")
            lines.append(f"- tokens/s over softmax: {part['tokens_per_s_over_softmax']}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (CI): every part end to end")
    parser.add_argument("--only", nargs="+", choices=["kernels", "bench_loss", "bandwidth", "decode", "train"],
                        help="run only these parts")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        # Before any Triton kernel is decorated: run them in Triton's CPU interpreter.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device visible: on a CPU machine run the smoke mode (make gpu-check CPU_SMOKE=1)")
    report = run("cpu-smoke" if args.cpu_smoke else "gpu", args.only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    summary = summary_markdown(report)
    (out / "gpu_check.md").write_text(summary + "\n", encoding="utf-8")
    print(summary)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    raise SystemExit(main())
