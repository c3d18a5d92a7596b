"""`pretrain bench train`: training tokens/s of the continuous vs the softmax head, same encoder.

For each vocabulary size, three models share one encoder configuration (model section of the
config) and differ only in the head: continuous (hidden -> D + continuous loss), continuous with
the fused head+loss, and softmax (hidden -> V + cross-entropy). Each is timed over full training
steps (forward, backward, AdamW) on random token ids, on one device, without DeepSpeed (the heads
are what differ; the distributed engine adds the same cost to both). The ratio is continuous /
softmax tokens/s, measured side by side in this one run.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pretrain.bench._timing import sync
from pretrain.config import load_config
from pretrain.model import batch_generator, build_model

HELP = "training tokens/s: continuous vs softmax head on the same encoder, at several vocabulary sizes"
DESCRIPTION = __doc__
# fused_head is set both ways: a config may turn it on (configs/base.yaml does).
HEADS = {"continuous": ["model.head=continuous", "loss.fused_head=false"], "continuous_fused": ["model.head=continuous", "loss.fused_head=true"],
         "softmax": ["model.head=softmax"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config whose model/loss/targets sections are used (default configs/tiny.yaml)")
    parser.add_argument("--vocab-sizes", default="4000,16000,64000", help="comma-separated vocabulary sizes")
    parser.add_argument("--objective", choices=["masked", "causal"], default="causal",
                        help="causal: every position reaches the head (the head's cost shows fully)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None, help="default: model.max_seq_len")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--heads", default=",".join(HEADS), help=f"which of {','.join(HEADS)}")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0: torch's default); 1 avoids thread-barrier stalls on a busy machine")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.d_model=256")


def time_head(cfg, vocab_size: int, device: torch.device, batch_size: int, seq_len: int, steps: int, warmup: int) -> dict:
    """Tokens/s and peak memory of full training steps of one model."""
    torch.manual_seed(0)
    # The same rule as the trainer: the softmax head needs the table too when embeddings start from it.
    needs_table = cfg.model.head == "continuous" or cfg.model.init_embeddings_from_targets
    table = F.normalize(torch.randn(vocab_size, cfg.targets.dim), dim=1) if needs_table else None
    model = build_model(cfg, vocab_size, table).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=gen)
    batch = model.objective({"input_ids": ids, "doc_ids": torch.zeros_like(ids)}, batch_generator(0, 0, 0, 0))
    batch = {k: v.to(device) for k, v in batch.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    head_params = sum(p.numel() for p in model.head.parameters())
    out = {"tokens_per_s": round(batch_size * seq_len / seconds, 1), "step_ms": round(seconds * 1e3, 2), "head_params": head_params}
    if device.type == "cuda":
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise ValueError(f"--heads: unknown {unknown}; choose from {list(HEADS)}")
    try:
        vocab_sizes = [int(v) for v in args.vocab_sizes.split(",")]
    except ValueError:
        raise ValueError(f"--vocab-sizes {args.vocab_sizes!r}: give comma-separated integers, e.g. 4000,16000,64000") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_config(args.config, [*args.overrides, f"model.objective={args.objective}"])
    seq_len = args.seq_len or base.model.max_seq_len
    results = []
    for vocab in vocab_sizes:
        row = {"vocab_size": vocab}
        for head in heads:
            cfg = load_config(args.config, [*args.overrides, f"model.objective={args.objective}", *HEADS[head]])
            row[head] = time_head(cfg, vocab, device, args.batch_size, seq_len, args.steps, args.warmup)
        if "continuous" in row and "softmax" in row:
            row["ratio_continuous_over_softmax"] = round(row["continuous"]["tokens_per_s"] / row["softmax"]["tokens_per_s"], 3)
        if "continuous_fused" in row and "softmax" in row:
            row["ratio_fused_over_softmax"] = round(row["continuous_fused"]["tokens_per_s"] / row["softmax"]["tokens_per_s"], 3)
        results.append(row)
    return {
        "suite": "train",
        "device": str(device),
        "objective": args.objective,
        "loss": base.loss.name,
        "model": {k: getattr(base.model, k) for k in ("d_model", "n_layers", "n_heads", "d_ff")},
        "target_dim": base.targets.dim,
        "batch_size": args.batch_size,
        "seq_len": seq_len,
        "cpu_threads": torch.get_num_threads(),
        "results": results,
    }
