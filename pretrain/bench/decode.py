"""`pretrain bench decode`: nearest-neighbour decoding throughput, FAISS vs plain torch matmul + topk.

For each vocabulary size V a random unit table [V, D] is searched with the same queries (noisy copies
of table rows) by every method, the methods interleaved round by round (process CPU time on CPU:
FAISS's OpenMP threads count, so a method is charged for all the cores it keeps busy); the result
is vectors/s per method (from the median [min, max]) and the ratio to torch on the same device. With a CUDA FAISS build the GPU and sharded-GPU placements are measured too; with
--approx the IVF and HNSW indexes are added with their recall against the exact search.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import faiss
import torch

from pretrain.bench._timing import clock_name, interleaved, load_average, pin_allocator
from pretrain.evaluation.decoder import IndexParams, NearestNeighbourDecoder, gpu_faiss_available, recall_at_k, torch_topk

HELP = "decoding throughput: FAISS (CPU/GPU/sharded) vs torch matmul+topk, V in 32k..256k"
DESCRIPTION = __doc__
# torch reference: query chunk so that one chunk's score matrix stays near 256 MiB.
_SCORES_PER_CHUNK = 1 << 26


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[32768, 131072, 262144], metavar="V", help="table sizes")
    parser.add_argument("--dim", type=int, default=256, help="vector dimension D")
    parser.add_argument("--queries", type=int, default=2048, help="predicted vectors searched per timing")
    parser.add_argument("--k", type=int, default=5, help="top-k")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, every method once per round (median [min, max]), after one warm-up")
    parser.add_argument("--approx", action="store_true", help="also IVF and HNSW (slow to build on CPU), with recall")
    parser.add_argument("--ivf-nlist", type=int, default=1024, help="IVF lists (k-means cells)")
    parser.add_argument("--ivf-nprobe", type=int, default=16, help="IVF lists searched per query")
    parser.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree")
    parser.add_argument("--hnsw-ef-search", type=int, default=128, help="HNSW search beam")
    parser.add_argument("--plot", default="bench/decode.png", help="PNG of vectors/s per method ('' to skip)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random table and queries")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch and FAISS alike (0: their defaults); 1 avoids thread-barrier stalls on a busy machine")


def _bench_one_size(vocab_size: int, args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    table = torch.nn.functional.normalize(torch.randn(vocab_size, args.dim, generator=g), dim=-1)
    rows = torch.randint(0, vocab_size, (args.queries,), generator=g)
    queries = table[rows] + 0.5 / args.dim**0.5 * torch.randn(args.queries, args.dim, generator=g)
    chunk = max(1, _SCORES_PER_CHUNK // vocab_size)
    searches: dict[str, object] = {"torch_cpu": lambda: torch_topk(table, queries, args.k, chunk)[1]}
    build_seconds: dict[str, float] = {}
    placements = ["cpu"]
    if gpu_faiss_available():
        placements += ["gpu"] + (["sharded"] if faiss.get_num_gpus() > 1 else [])
    indexes = ["flat"] + (["ivf", "hnsw"] if args.approx else [])
    params = IndexParams(args.ivf_nlist, args.ivf_nprobe, args.hnsw_m, args.hnsw_ef_search)
    for index in indexes:
        for placement in placements:
            if index == "hnsw" and placement != "cpu":
                continue  # no GPU HNSW in FAISS
            start = time.perf_counter()
            decoder = NearestNeighbourDecoder(table, index=index, device=placement, params=params)
            name = f"faiss_{index}_{placement}"
            build_seconds[name] = time.perf_counter() - start
            searches[name] = lambda decoder=decoder: decoder.search(queries, args.k)[1]
    cuda = torch.cuda.is_available()
    if cuda:
        table_gpu, queries_gpu = table.cuda(), queries.cuda()
        searches["torch_cuda"] = lambda: torch_topk(table_gpu, queries_gpu, args.k, chunk)[1]
    # Every method in the same rounds (process CPU time on CPU; with a GPU, CUDA events for all).
    timed = interleaved(searches, args.repeats, torch.device("cuda" if cuda else "cpu"))
    methods: dict[str, dict] = {}
    torch_ids = searches["torch_cpu"]()
    for name, row in timed.items():
        methods[name] = {"vectors_per_s": round(args.queries / (row["ms"] / 1e3), 1), **row}
        if name in build_seconds:
            methods[name]["build_s"] = round(build_seconds[name], 3)
        if name.startswith("faiss_"):
            # Same table, same queries: the exact index must agree with torch; approximate ones report recall.
            ids = searches[name]()
            key = "top1_agreement_with_torch" if "_flat_" in name else "recall@1"
            methods[name][key] = round(float((ids[:, 0] == torch_ids[:, 0]).float().mean()), 4)
            if "_flat_" not in name:
                methods[name][f"recall@{args.k}"] = round(recall_at_k(ids, torch_ids), 4)
    ratios = {
        f"{name}_vs_torch_cpu": round(m["vectors_per_s"] / methods["torch_cpu"]["vectors_per_s"], 3)
        for name, m in methods.items()
        if name.startswith("faiss_") and name.endswith("_cpu")
    }
    if "torch_cuda" in methods:
        ratios.update(
            {
                f"{name}_vs_torch_cuda": round(m["vectors_per_s"] / methods["torch_cuda"]["vectors_per_s"], 3)
                for name, m in methods.items()
                if name.startswith("faiss_") and not name.endswith("_cpu")
            }
        )
    return {"vocab_size": vocab_size, "methods": methods, "ratios": ratios}


def _plot(results: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for r in results for name in r["methods"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        points = [(r["vocab_size"], r["methods"][name]["vectors_per_s"]) for r in results if name in r["methods"]]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="vocabulary size V", ylabel="vectors / s", title="Nearest-neighbour decoding")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> dict:
    if args.k < 1 or args.queries < 1 or args.dim < 1:
        raise ValueError("--k, --queries and --dim must be at least 1")
    if min(args.vocab_sizes) < args.k:
        raise ValueError(f"--vocab-sizes {min(args.vocab_sizes)} is smaller than --k {args.k}: top-k needs at least k rows")
    logging.getLogger("pretrain.evaluation.decoder").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    allocator = pin_allocator()
    load_before = load_average()
    results = [_bench_one_size(v, args) for v in args.vocab_sizes]
    out = {
        "suite": "decode",
        "clock": clock_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")), "repeats": args.repeats,
        "load_average": {"before": load_before, "after": load_average()}, "allocator_pinned": allocator,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "threads": {"faiss_omp": faiss.omp_get_max_threads(), "torch": torch.get_num_threads()},
        "faiss_version": faiss.__version__,
        "faiss_gpus": faiss.get_num_gpus() if gpu_faiss_available() else 0,
        "results": results,
    }
    if args.plot:
        out["plot"] = _plot(results, args.plot)
    return out
