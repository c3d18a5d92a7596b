"""`pretrain bench loss`: output head + loss, forward+backward time and peak memory, per vocabulary size.

For each V, from the same hidden states [N, H] and targets:
  softmax          Linear(H → V) + torch.nn.functional.cross_entropy (the full N×V logits)
  softmax_chunked  the same, token chunk by token chunk (logits and their gradient one chunk at a time)
  <loss>           Linear(H → D) + pretrain_kernels.continuous_loss against a [V, D] target table
  <loss>+fused     fused_linear_continuous_loss (head and loss fused, chunked)
Ratios are softmax / continuous (time and memory), measured side by side in this run. Peak memory is
what the step allocates beyond its inputs (CUDA: max_memory_allocated; CPU: torch's MemTracker).

On CUDA the suite also times each Triton kernel against its PyTorch reference (same inputs) and
reports the kernel's achieved memory bandwidth as a fraction of the device's peak.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.bench._timing import best_seconds
from pretrain_kernels import LOSS_NAMES, continuous_loss, fused_linear_continuous_loss

HELP = "loss heads: continuous losses vs softmax cross-entropy, V in 32k..256k (time, peak memory, ratios)"
DESCRIPTION = __doc__
log = logging.getLogger(__name__)
_CUDA = torch.cuda.is_available()
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults: the GPU target shape on CUDA; a shape that finishes in a minute or two on a small CPU.
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[32768, 131072, 262144], metavar="V")
    parser.add_argument("--tokens", type=int, default=8192 if _CUDA else 256, help="tokens N per step")
    parser.add_argument("--hidden", type=int, default=1024 if _CUDA else 128, help="hidden size H")
    parser.add_argument("--dim", type=int, default=512 if _CUDA else 64, help="target dimension D")
    parser.add_argument("--losses", nargs="+", default=list(LOSS_NAMES), choices=LOSS_NAMES, metavar="LOSS",
                        help=f"continuous losses to time (default all: {', '.join(LOSS_NAMES)})")
    parser.add_argument("--chunk-size", type=int, default=2048 if _CUDA else 64,
                        help="token chunk of the chunked softmax and of the fused head")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16" if _CUDA else "fp32")
    parser.add_argument("--impl", choices=["auto", "triton", "reference"], default="auto", help="continuous loss implementation")
    parser.add_argument("--no-fused", action="store_true", help="leave out the fused head + loss variants")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (best kept) after one warm-up")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0: torch's default); 1 avoids thread-barrier stalls on a busy machine")
    parser.add_argument("--plot", default="bench/loss.png", help="PNG of time and memory against V ('' to skip)")
    parser.add_argument("--seed", type=int, default=0)


# Measuring ---------------------------------------------------------------------------------------

def peak_bytes(step, device: torch.device) -> int | None:
    """Bytes a step allocates at its peak beyond what exists before it (None if it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # a private torch module: report nothing rather than guess
        return None
    tracker = MemTracker()
    with tracker:
        step()
    return int(tracker.get_tracker_snapshot("peak")[device]["Total"])


# The steps (forward + backward of one head) ------------------------------------------------------
# Leaves are made once, outside the measured step: a .detach() alias inside it would be counted by
# the CPU memory tracker as a new allocation of the whole tensor.

def _leaves(*tensors):
    return [t.requires_grad_(True) for t in tensors]


def _zero_grads(*leaves):
    for leaf in leaves:
        leaf.grad = None


def _softmax_step(hidden, weight, targets):
    h, w = _leaves(hidden.clone(), weight.clone())

    def step():
        _zero_grads(h, w)
        F.cross_entropy(h @ w.T, targets).backward()
    return step


def _chunked_softmax_step(hidden, weight, targets, chunk):
    w = weight.clone().requires_grad_(True)

    def step():
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].requires_grad_(True)  # a slice view: no copy
            loss = F.cross_entropy(h @ w.T, targets[start : start + chunk], reduction="sum") / hidden.shape[0]
            gh, gw = torch.autograd.grad(loss, (h, w))
            grad_hidden[start : start + chunk] = gh
            grad_weight += gw
    return step


def _continuous_step(hidden, weight, bias, targets, table, kind, impl):
    h, w, b = _leaves(hidden.clone(), weight.clone(), bias.clone())

    def step():
        _zero_grads(h, w, b)
        continuous_loss(F.linear(h, w, b), targets, table, kind, impl=impl).backward()
    return step


def _fused_step(hidden, weight, bias, targets, table, kind, impl, chunk):
    h, w, b = _leaves(hidden.clone(), weight.clone(), bias.clone())

    def step():
        _zero_grads(h, w, b)
        fused_linear_continuous_loss(h, w, b, targets, table, kind, chunk, impl=impl).backward()
    return step


def _measure(step, args, device) -> dict:
    seconds = best_seconds(step, args.repeats, device)
    peak = peak_bytes(step, device)
    return {"ms": round(seconds * 1e3, 3), "peak_mib": None if peak is None else round(peak / 2**20, 2)}


def _bench_vocab(vocab: int, args, device, dtype) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(args.seed + vocab)
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(device, dtype)  # noqa: E731
    hidden = make(args.tokens, args.hidden)
    targets = torch.randint(0, vocab, (args.tokens,), generator=gen).to(device)
    rows: dict[str, dict] = {}
    softmax_weight = make(vocab, args.hidden, scale=args.hidden**-0.5)
    rows["softmax"] = _measure(_softmax_step(hidden, softmax_weight, targets), args, device)
    rows["softmax_chunked"] = _measure(_chunked_softmax_step(hidden, softmax_weight, targets, args.chunk_size), args, device)
    del softmax_weight
    table = F.normalize(make(vocab, args.dim).float(), dim=-1).to(dtype)
    head_weight, head_bias = make(args.dim, args.hidden, scale=args.hidden**-0.5), make(args.dim, scale=0.0)
    for kind in args.losses:
        rows[kind] = _measure(_continuous_step(hidden, head_weight, head_bias, targets, table, kind, args.impl), args, device)
        if not args.no_fused:
            rows[f"{kind}+fused"] = _measure(
                _fused_step(hidden, head_weight, head_bias, targets, table, kind, args.impl, args.chunk_size), args, device
            )
    return rows


def _ratios(rows: dict) -> dict:
    out = {}
    for name, row in rows.items():
        if name.startswith("softmax"):
            continue
        out[name] = {
            "time_softmax_over_continuous": round(rows["softmax"]["ms"] / row["ms"], 2),
            "time_chunked_softmax_over_continuous": round(rows["softmax_chunked"]["ms"] / row["ms"], 2),
        }
        if row["peak_mib"] and rows["softmax"]["peak_mib"] is not None:
            out[name]["memory_softmax_over_continuous"] = round(rows["softmax"]["peak_mib"] / row["peak_mib"], 2)
    return out


# CUDA only: the kernels against their references ------------------------------------------------

def peak_bandwidth_bytes_per_s(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8  # double data rate


def _bench_kernels(args, device, dtype) -> dict:
    from pretrain_kernels import LossParams
    from pretrain_kernels.pointwise import loss_rows_and_grads

    vocab = max(args.vocab_sizes)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    pred = torch.randn(args.tokens, args.dim, generator=gen).to(device, dtype)
    targets = torch.randint(0, vocab, (args.tokens,), generator=gen).to(device)
    table = F.normalize(torch.randn(vocab, args.dim, generator=gen), dim=-1).to(device, dtype)
    peak_bw = peak_bandwidth_bytes_per_s(device)
    scale = torch.full((), 1.0 / args.tokens, device=device)
    out = {}
    for kind in args.losses:
        def autograd_step(impl):
            def step():
                p = pred.detach().requires_grad_(True)
                continuous_loss(p, targets, table, kind, impl=impl).backward()
            return step

        triton_s = best_seconds(autograd_step("triton"), args.repeats, device)
        reference_s = best_seconds(autograd_step("reference"), args.repeats, device)
        row = {"triton_ms": round(triton_s * 1e3, 3), "reference_ms": round(reference_s * 1e3, 3),
               "speedup": round(reference_s / triton_s, 2)}
        if kind != "margin":  # the margin's search is compute-bound (an N×V×D product), not a streaming op
            kernel_s = best_seconds(
                lambda: loss_rows_and_grads(pred, targets, table, kind, LossParams(), -100, scale, want_pred_grad=True),
                args.repeats, device,
            )
            # Minimum traffic of the fused forward+backward launch: read p and E[y], write dL/dp.
            moved = 3 * pred.numel() * pred.element_size() + args.tokens * 12
            row["kernel_ms"] = round(kernel_s * 1e3, 4)
            row["achieved_gb_s"] = round(moved / kernel_s / 1e9, 1)
            if peak_bw:
                row["fraction_of_peak_bandwidth"] = round(moved / kernel_s / peak_bw, 3)
        out[kind] = row
    # Fused head + loss: Triton kernels inside vs the reference inside.
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype)
    weight = (torch.randn(args.dim, args.hidden, generator=gen) * args.hidden**-0.5).to(device, dtype)
    bias = torch.zeros(args.dim, device=device, dtype=dtype)
    for kind in ("cosine", "vmf_practice"):
        if kind not in args.losses:
            continue
        triton_s = best_seconds(_fused_step(hidden, weight, bias, targets, table, kind, "triton", args.chunk_size), args.repeats, device)
        reference_s = best_seconds(_fused_step(hidden, weight, bias, targets, table, kind, "reference", args.chunk_size), args.repeats, device)
        out[f"{kind}+fused"] = {"triton_ms": round(triton_s * 1e3, 3), "reference_ms": round(reference_s * 1e3, 3),
                                "speedup": round(reference_s / triton_s, 2)}
    return {"vocab": vocab, "peak_bandwidth_gb_s": None if peak_bw is None else round(peak_bw / 1e9, 1), "losses": out}


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocabs = sorted(int(v) for v in results)
    names = list(results[str(vocabs[0])])
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in names:
        style = "-o" if name.startswith("softmax") else "--."
        ax_time.plot(vocabs, [results[str(v)][name]["ms"] for v in vocabs], style, label=name)
        mem = [results[str(v)][name]["peak_mib"] for v in vocabs]
        if None not in mem:
            ax_mem.plot(vocabs, mem, style, label=name)
    for ax, label in ((ax_time, "forward+backward (ms)"), (ax_mem, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    if args.tokens <= 0 or args.hidden <= 0 or args.dim < 4 or args.chunk_size <= 0:
        raise ValueError("--tokens, --hidden and --chunk-size must be positive and --dim at least 4")
    device = torch.device("cuda" if _CUDA else "cpu")
    dtype = _DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    results, ratios = {}, {}
    for vocab in args.vocab_sizes:
        log.info("bench loss: V=%d", vocab)
        results[str(vocab)] = _bench_vocab(vocab, args, device, dtype)
        ratios[str(vocab)] = _ratios(results[str(vocab)])
    out = {
        "suite": "loss",
        "device": torch.cuda.get_device_name(device) if _CUDA else "cpu",
        "shape": {"tokens": args.tokens, "hidden": args.hidden, "dim": args.dim, "dtype": args.dtype,
                  "chunk_size": args.chunk_size, "impl": args.impl, "cpu_threads": torch.get_num_threads()},
        "results": results,
        "ratios": ratios,
        "kernels": _bench_kernels(args, device, dtype) if _CUDA else "not measured: no CUDA device",
    }
    if args.plot:
        _plot(results, args.plot)
        out["plot"] = args.plot
    return out
