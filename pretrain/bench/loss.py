"""`pretrain bench loss`: output head + loss, forward+backward time and peak memory, per vocabulary size.

For each V, from the same hidden states [N, H] and the same Zipf-distributed targets (a language's
token frequencies; the adaptive softmax needs them, the other heads do not care):
  softmax           Linear(H -> V) + torch.nn.functional.cross_entropy (the full N x V logits)
  softmax_chunked   Liger-style chunked linear cross-entropy: per token chunk, logits, loss and their
                    gradients in the forward pass, one accumulated V x H weight gradient; backward
                    only scales the stored gradients (the strongest plain-torch softmax baseline)
  adaptive_softmax  torch.nn.AdaptiveLogSoftmaxWithLoss (Grave et al. 2017), cutoffs V/64, V/12, V/2.6
  liger, cce        on CUDA only, when installed (`pip install -e '.[bench]'`): Liger-Kernel's fused
                    linear cross-entropy and Apple's Cut Cross-Entropy
  <loss> D<d>       Linear(H -> D) + pretrain_kernels.continuous_loss against a [V, D] target table
  <loss>+fused D<d>  fused_linear_continuous_loss (head and loss fused, chunked)
All methods of one V are timed interleaved, round by round (pretrain/bench/_timing.py: process CPU
time on CPU, CUDA events on GPU; median [min, max] of the repeats). Ratios are softmax / continuous
(time and memory) with the FLOP-ideal ratio V/D beside them: the softmax head's matmuls cost
6*N*H*V FLOPs, the continuous head's 6*N*H*D. Peak memory is what the step allocates beyond its
inputs (CUDA: max_memory_allocated; CPU: torch's MemTracker).

On CUDA the suite also times each Triton kernel against its PyTorch reference (same inputs) and
reports the kernel's achieved memory bandwidth as a fraction of the device's peak.
"""
from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.bench._timing import clock_name, interleaved, load_average, pin_allocator
from pretrain_kernels import LOSS_NAMES, continuous_loss, fused_linear_continuous_loss

HELP = "loss heads: continuous losses vs softmax, chunked CE, adaptive softmax (GPU: Liger, CCE), V in 32k..256k"
DESCRIPTION = __doc__
log = logging.getLogger(__name__)
_CUDA = torch.cuda.is_available()
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SOFTMAX_PEERS = ("softmax", "softmax_chunked", "adaptive_softmax", "liger", "cce")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults: the GPU target shape on CUDA; on CPU the smallest shape whose numbers mean something
    # (below N=1024, H=256 the continuous side is per-call overhead and the ratios flatter it).
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[32768, 131072, 262144], metavar="V")
    parser.add_argument("--tokens", type=int, default=8192 if _CUDA else 1024, help="tokens N per step")
    parser.add_argument("--hidden", type=int, default=1024 if _CUDA else 256, help="hidden size H")
    parser.add_argument("--dims", "--dim", type=int, nargs="+", default=[64, 512], metavar="D", help="target dimensions D")
    parser.add_argument("--losses", nargs="+", default=list(LOSS_NAMES), choices=LOSS_NAMES, metavar="LOSS",
                        help=f"continuous losses to time (default all: {', '.join(LOSS_NAMES)})")
    parser.add_argument("--chunk-size", type=int, default=2048 if _CUDA else 256,
                        help="token chunk of the chunked softmax and of the fused head")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16" if _CUDA else "fp32")
    parser.add_argument("--impl", choices=["auto", "triton", "reference"], default="auto", help="continuous loss implementation")
    parser.add_argument("--no-fused", action="store_true", help="leave out the fused head + loss variants")
    parser.add_argument("--no-peers", action="store_true", help="leave out the adaptive softmax and the GPU peers")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per method (median [min, max]), after one warm-up")
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


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (hidden @ weight.T, targets), Liger-style: gradients made in the forward.

    Per chunk of rows: logits, log-sum-exp, the loss, grad_logits = (softmax - one_hot) / N, then
    grad_hidden (stored) and grad_weight (accumulated into one buffer). No N x V tensor and no second
    pass over the logits; backward only scales the stored gradients by the incoming one.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' own buffer
            grad[torch.arange(len(t), device=t.device), t] -= 1.0
            grad = grad.div_(n).to(hidden.dtype)
            grad_hidden[start : start + chunk] = grad @ weight
            grad_weight.addmm_(grad.T.float(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out, grad_weight * grad_out, None, None


def _chunked_softmax_step(hidden, weight, targets, chunk):
    h, w = _leaves(hidden.clone(), weight.clone())

    def step():
        _zero_grads(h, w)
        ChunkedLinearCrossEntropy.apply(h, w, targets, chunk).backward()
    return step


def adaptive_cutoffs(vocab: int) -> list[int]:
    """Cluster boundaries like Grave et al.'s [2k, 10k, 50k] at V=128k, scaled to V."""
    cutoffs = sorted({max(1, round(vocab / div)) for div in (64, 12, 2.6)})
    return [c for c in cutoffs if c < vocab]


def _adaptive_step(hidden, targets, vocab, dtype):
    h = _leaves(hidden.clone())[0]
    head = torch.nn.AdaptiveLogSoftmaxWithLoss(hidden.shape[1], vocab, adaptive_cutoffs(vocab), div_value=4.0)
    head = head.to(hidden.device, dtype)

    def step():
        _zero_grads(h, *head.parameters())
        head(h, targets).loss.backward()
    return step


# The fused cross-entropy kernels users pick on a GPU: row name -> (module, function, PyPI package).
# Both take (hidden [N, H], weight [V, H], targets [N]) and return the mean loss.
GPU_PEERS = {
    "liger": ("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy", "liger-kernel"),
    "cce": ("cut_cross_entropy", "linear_cross_entropy", "cut-cross-entropy"),
}


def _gpu_peer_steps(hidden, weight, targets) -> tuple[dict, dict]:
    """Liger-Kernel and Cut Cross-Entropy steps where CUDA and the package are there; else the reason."""
    if hidden.device.type != "cuda":
        return {}, {name: "not measured: no CUDA device" for name in GPU_PEERS}
    steps, missing = {}, {}
    h, w = _leaves(hidden.clone(), weight.clone())
    for name, (module, function, package) in GPU_PEERS.items():
        try:
            loss_fn = getattr(importlib.import_module(module), function)
        except ImportError:
            missing[name] = f"not measured: {package} not installed (pip install -e '.[bench]')"
            continue

        def step(loss_fn=loss_fn):
            _zero_grads(h, w)
            loss_fn(h, w, targets).backward()
        steps[name] = step
    return steps, missing


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


def zipf_targets(vocab: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Token ids with Zipf(1) frequencies, id 0 the most frequent (the adaptive softmax's convention)."""
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(weights, n, replacement=True, generator=gen)


def _bench_vocab(vocab: int, args, device, dtype) -> dict:
    """Every method at this V: timed interleaved, then each one's peak memory."""
    gen = torch.Generator(device="cpu").manual_seed(args.seed + vocab)
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(device, dtype)  # noqa: E731
    hidden = make(args.tokens, args.hidden)
    targets = zipf_targets(vocab, args.tokens, gen).to(device)
    softmax_weight = make(vocab, args.hidden, scale=args.hidden**-0.5)
    steps = {"softmax": _softmax_step(hidden, softmax_weight, targets),
             "softmax_chunked": _chunked_softmax_step(hidden, softmax_weight, targets, args.chunk_size)}
    dims, skipped = {}, {}
    if not args.no_peers:
        steps["adaptive_softmax"] = _adaptive_step(hidden, targets, vocab, dtype)
        gpu_steps, skipped = _gpu_peer_steps(hidden, softmax_weight, targets)
        steps.update(gpu_steps)
    del softmax_weight
    for dim in args.dims:
        table = F.normalize(make(vocab, dim).float(), dim=-1).to(dtype)
        head_weight, head_bias = make(dim, args.hidden, scale=args.hidden**-0.5), make(dim, scale=0.0)
        for kind in args.losses:
            name = f"{kind} D{dim}"
            steps[name] = _continuous_step(hidden, head_weight, head_bias, targets, table, kind, args.impl)
            dims[name] = dim
            if not args.no_fused:
                steps[f"{kind}+fused D{dim}"] = _fused_step(hidden, head_weight, head_bias, targets, table, kind,
                                                             args.impl, args.chunk_size)
                dims[f"{kind}+fused D{dim}"] = dim
    rows = interleaved(steps, args.repeats, device)
    for name, step in steps.items():
        peak = peak_bytes(step, device)
        rows[name]["peak_mib"] = None if peak is None else round(peak / 2**20, 2)
        if name in dims:
            rows[name]["dim"] = dims[name]
    rows.update({name: {"skipped": reason} for name, reason in skipped.items()})
    return rows


def _ratios(rows: dict, vocab: int) -> dict:
    """Per continuous head: each softmax peer's time (memory) over its own, beside the FLOP-ideal V/D."""
    out = {}
    peers = [p for p in SOFTMAX_PEERS if "ms" in rows.get(p, {})]
    for name, row in rows.items():
        if "dim" not in row:
            continue
        ideal = vocab / row["dim"]
        ratio = {"flop_ideal_v_over_d": round(ideal, 1)}
        for peer in peers:
            ratio[f"time_{peer}_over_continuous"] = round(rows[peer]["ms"] / row["ms"], 2)
            if row.get("peak_mib") and rows[peer].get("peak_mib") is not None:
                ratio[f"memory_{peer}_over_continuous"] = round(rows[peer]["peak_mib"] / row["peak_mib"], 2)
        ratio["softmax_time_ratio_over_flop_ideal"] = round(ratio["time_softmax_over_continuous"] / ideal, 3)
        out[name] = ratio
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


def _kernel_row(timed: dict) -> dict:
    triton, reference = timed["triton"], timed["reference"]
    return {"triton_ms": triton["ms"], "triton_min_max_ms": [triton["min_ms"], triton["max_ms"]],
            "reference_ms": reference["ms"], "reference_min_max_ms": [reference["min_ms"], reference["max_ms"]],
            "speedup": round(reference["ms"] / triton["ms"], 2)}


def _bench_kernels(args, device, dtype) -> dict:
    from pretrain_kernels import LossParams
    from pretrain_kernels.pointwise import loss_rows_and_grads

    vocab, dim = max(args.vocab_sizes), max(args.dims)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    pred = torch.randn(args.tokens, dim, generator=gen).to(device, dtype)
    targets = torch.randint(0, vocab, (args.tokens,), generator=gen).to(device)
    table = F.normalize(torch.randn(vocab, dim, generator=gen), dim=-1).to(device, dtype)
    peak_bw = peak_bandwidth_bytes_per_s(device)
    scale = torch.full((), 1.0 / args.tokens, device=device)
    out = {}
    for kind in args.losses:
        def autograd_step(impl):
            def step():
                p = pred.detach().requires_grad_(True)
                continuous_loss(p, targets, table, kind, impl=impl).backward()
            return step

        timed = interleaved({"triton": autograd_step("triton"), "reference": autograd_step("reference")}, args.repeats, device)
        row = _kernel_row(timed)
        if kind != "margin":  # the margin's search is compute-bound (an N×V×D product), not a streaming op
            kernel = interleaved({"kernel": lambda: loss_rows_and_grads(pred, targets, table, kind, LossParams(), -100, scale,
                                                                        want_pred_grad=True)}, args.repeats, device)["kernel"]
            kernel_s = kernel["ms"] / 1e3
            # Minimum traffic of the fused forward+backward launch: read p and E[y], write dL/dp.
            moved = 3 * pred.numel() * pred.element_size() + args.tokens * 12
            row["kernel_ms"] = round(kernel_s * 1e3, 4)
            row["achieved_gb_s"] = round(moved / kernel_s / 1e9, 1)
            if peak_bw:
                row["fraction_of_peak_bandwidth"] = round(moved / kernel_s / peak_bw, 3)
        out[kind] = row
    # Fused head + loss: Triton kernels inside vs the reference inside.
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype)
    weight = (torch.randn(dim, args.hidden, generator=gen) * args.hidden**-0.5).to(device, dtype)
    bias = torch.zeros(dim, device=device, dtype=dtype)
    for kind in ("cosine", "vmf_practice"):
        if kind not in args.losses:
            continue
        timed = interleaved({impl: _fused_step(hidden, weight, bias, targets, table, kind, impl, args.chunk_size)
                             for impl in ("triton", "reference")}, args.repeats, device)
        out[f"{kind}+fused"] = _kernel_row(timed)
    return {"vocab": vocab, "dim": dim, "peak_bandwidth_gb_s": None if peak_bw is None else round(peak_bw / 1e9, 1), "losses": out}


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocabs = sorted(int(v) for v in results)
    names = [n for n, row in results[str(vocabs[0])].items() if "ms" in row]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in names:
        style = "-o" if name in SOFTMAX_PEERS else "--."
        ax_time.plot(vocabs, [results[str(v)][name]["ms"] for v in vocabs], style, label=name)
        mem = [results[str(v)][name]["peak_mib"] for v in vocabs]
        if None not in mem:
            ax_mem.plot(vocabs, mem, style, label=name)
    for ax, label in ((ax_time, "forward+backward, median (ms)"), (ax_mem, "peak memory (MiB)")):
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
    if args.tokens <= 0 or args.hidden <= 0 or min(args.dims) < 4 or args.chunk_size <= 0:
        raise ValueError("--tokens, --hidden and --chunk-size must be positive and --dims at least 4")
    device = torch.device("cuda" if _CUDA else "cpu")
    dtype = _DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = pin_allocator()
    load_before = load_average()
    results, ratios = {}, {}
    for vocab in args.vocab_sizes:
        log.info("bench loss: V=%d", vocab)
        results[str(vocab)] = _bench_vocab(vocab, args, device, dtype)
        ratios[str(vocab)] = _ratios(results[str(vocab)], vocab)
    out = {
        "suite": "loss",
        "device": torch.cuda.get_device_name(device) if _CUDA else "cpu",
        "shape": {"tokens": args.tokens, "hidden": args.hidden, "dims": args.dims, "dtype": args.dtype,
                  "chunk_size": args.chunk_size, "impl": args.impl, "cpu_threads": torch.get_num_threads()},
        "clock": clock_name(device), "repeats": args.repeats, "load_average": {"before": load_before, "after": load_average()},
        "allocator_pinned": allocator,
        "results": results,
        "ratios": ratios,
        "kernels": _bench_kernels(args, device, dtype) if _CUDA else "not measured: no CUDA device",
    }
    if args.plot:
        _plot(results, args.plot)
        out["plot"] = args.plot
    return out
