"""`pretrain bench train`: training tokens/s of the continuous vs the softmax head, same encoder.

For each vocabulary size, three models share one encoder configuration (model section of the
config) and differ only in the head: continuous (hidden -> D + continuous loss), continuous with
the fused head+loss, and softmax (hidden -> V + cross-entropy). Every model gets the same optimizer
(--optimizer; a fair A/B: the softmax head's V x H output weight is dense by nature, the input
embedding of both is not):
  sparse   row-sparse input embedding + lazy row AdamW, fused AdamW for the rest (the trainer's
           train.sparse_embedding=true; pretrain/engine/optim.py)
  fused    torch's fused AdamW on every parameter (the trainer's default)
  default  torch.optim.AdamW with torch's defaults (a Python loop over tensors on CPU)
--input-embedding targets gives every model the frozen target table through a learned D -> d_model
adapter as its input embedding (model.input_embedding=targets: nothing V-sized is trained but the
softmax head's output layer; with --optimizer fused or default, as under ZeRO-1/2/3).

Each full step (forward, backward, optimizer) is timed phase by phase; the models take turns round
by round (pretrain/bench/_timing.py: process CPU time on CPU, CUDA events on GPU, median [min, max]
of --repeats). Beside each measured continuous / softmax ratio stands the FLOP-ideal one: the
ratio of the two steps' matmul FLOPs per token (encoder 6 x non-embedding weights, attention
12 x layers x seq_len x d_model, head 6 x d_model x V or D, the table input's adapter 4 x D x d_model:
its input needs no gradient); the optimizer and the embedding lookup are not in it, so a gap between
the two is what they cost.

--engine also times the continuous model wrapped in the DeepSpeed engine the trainer uses (one
process, the config's ZeRO stage) against the bare PyTorch step: the engine's own overhead.
"""
from __future__ import annotations

import argparse
import os
import statistics
from unittest import mock

import torch
import torch.nn.functional as F

from pretrain.bench._timing import MIN_REPEATS, clock_name, load_average, pin_allocator, rotated_rounds, sync, timed_seconds
from pretrain.config import load_config
from pretrain.engine.distributed import detect, init_distributed
from pretrain.engine.optim import build_optimizer, skip_single_replica_allreduce
from pretrain.model import batch_generator, build_model

HELP = "training tokens/s: continuous vs softmax head on the same encoder, per vocabulary size, with the FLOP-ideal ratio"
DESCRIPTION = __doc__
# fused_head is set both ways: a config may turn it on (configs/base.yaml does).
HEADS = {"continuous": ["model.head=continuous", "loss.fused_head=false"], "continuous_fused": ["model.head=continuous", "loss.fused_head=true"],
         "softmax": ["model.head=softmax", "model.tie_softmax=false"]}
OPTIMIZERS = {"sparse": ["train.sparse_embedding=true", "train.zero_stage=0", "train.precision=fp32"],
              "fused": ["train.sparse_embedding=false"], "default": ["train.sparse_embedding=false"]}
INPUT_EMBEDDINGS = {"learned": ["model.input_embedding=learned"],
                    "targets": ["model.input_embedding=targets", "train.sparse_embedding=false"]}
PHASES = ("forward", "backward", "optimizer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config whose model/loss/targets sections are used (default configs/tiny.yaml)")
    parser.add_argument("--vocab-sizes", default="4096,16384,65536,131072", help="comma-separated vocabulary sizes")
    parser.add_argument("--objective", choices=["masked", "causal"], default="causal",
                        help="causal: every position reaches the head (the head's cost shows fully)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None, help="default: model.max_seq_len")
    parser.add_argument("--repeats", type=int, default=9,
                        help="timed rounds, every model one step per round (median [min, max]; 9: steady on a loaded 2-core machine)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of every model first")
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="sparse", help="the optimizer of every model (see above)")
    parser.add_argument("--input-embedding", choices=list(INPUT_EMBEDDINGS), default="learned",
                        help="every model's input embedding: a learned V x d_model table, or the frozen target table + "
                             "a learned adapter (model.input_embedding=targets; needs --optimizer fused or default)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--heads", default=",".join(HEADS), help=f"which of {','.join(HEADS)}")
    parser.add_argument("--engine", action="store_true", help="also the DeepSpeed engine's overhead over a bare step (continuous head)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0: torch's default); 1 avoids thread-barrier stalls on a busy machine")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.d_model=256")


def flops_per_token(cfg, vocab_size: int, seq_len: int) -> float:
    """Matmul FLOPs of one training step per token (forward + backward = 3 x 2 x weights)."""
    m = cfg.model
    encoder = m.n_layers * (4 * m.d_model**2 + 2 * m.d_model * m.d_ff)
    attention = m.n_layers * 2 * seq_len * m.d_model  # QK^T and AV, per token
    head = m.d_model * (vocab_size if m.head == "softmax" else cfg.targets.dim)
    adapter = 4.0 * cfg.targets.dim * m.d_model if m.input_embedding == "targets" else 0.0
    return 6.0 * (encoder + attention + head) + adapter


class TimedModel:
    """One model, its optimizer and its batch; step() runs one training step, timing each phase."""

    def __init__(self, cfg, vocab_size: int, device: torch.device, batch_size: int, seq_len: int, optimizer: str) -> None:
        torch.manual_seed(0)
        # The same rule as the trainer: the softmax head needs the table too when the input embedding uses it.
        table = F.normalize(torch.randn(vocab_size, cfg.targets.dim), dim=1) if cfg.reads_target_table else None
        self.model = build_model(cfg, vocab_size, table).to(device).train()
        groups = self.model.param_groups(cfg.train.weight_decay, cfg.train.lr)
        self.optimizer = (torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas) if optimizer == "default"
                          else build_optimizer(groups, cfg.train))
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=gen)
        batch = self.model.objective({"input_ids": ids, "doc_ids": torch.zeros_like(ids)}, batch_generator(0, 0, 0, 0))
        self.batch = {k: v.to(device) for k, v in batch.items()}
        self.device = device
        self.samples: dict[str, list[float]] = {phase: [] for phase in PHASES}
        self.head_params = sum(p.numel() for p in self.model.head.parameters())

    def _forward(self):
        self.loss = self.model(self.batch)["loss"]

    def _backward(self):
        self.loss.backward()

    def _optimizer(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, record: bool) -> None:
        for phase, fn in zip(PHASES, (self._forward, self._backward, self._optimizer)):
            seconds = timed_seconds(fn, self.device)
            if record:
                self.samples[phase].append(seconds)

    def step_seconds(self) -> list[float]:
        """Each timed round's full step (forward + backward + optimizer)."""
        return [sum(parts) for parts in zip(*self.samples.values())]

    def summary(self, tokens: int) -> dict:
        totals = self.step_seconds()
        step_s = statistics.median(totals)
        out = {"tokens_per_s": round(tokens / step_s, 1), "step_ms": round(step_s * 1e3, 2),
               "step_min_max_ms": [round(min(totals) * 1e3, 2), round(max(totals) * 1e3, 2)]}
        for phase, samples in self.samples.items():
            out[f"{phase}_ms"] = round(statistics.median(samples) * 1e3, 2)
        out["head_params"] = self.head_params
        return out


def time_models(models: dict[str, TimedModel], repeats: int, warmup: int) -> None:
    """Warm-up steps of each, then `repeats` rounds in which every model steps once (order rotating)."""
    names = list(models)
    for _ in range(warmup):
        for name in names:
            models[name].step(record=False)
    for order in rotated_rounds(names, repeats):
        for name in order:
            models[name].step(record=True)


def _ratio_row(row: dict, models: dict[str, TimedModel], cfgs: dict, vocab: int, seq_len: int) -> None:
    """continuous / softmax tokens/s as the median of the rounds' own ratios (each round's two steps ran
    back to back, so a burst of load from another job mostly cancels), with [min, max], beside the
    FLOP-ideal ratio."""
    if "softmax" not in row:
        return
    ideal = flops_per_token(cfgs["softmax"], vocab, seq_len)
    softmax_s = models["softmax"].step_seconds()
    for head in ("continuous", "continuous_fused"):
        if head in row:
            per_round = [s / h for s, h in zip(softmax_s, models[head].step_seconds())]
            measured = statistics.median(per_round)
            flop_ideal = ideal / flops_per_token(cfgs[head], vocab, seq_len)
            row[f"ratio_{head}_over_softmax"] = round(measured, 3)
            row[f"ratio_{head}_over_softmax_min_max"] = [round(min(per_round), 3), round(max(per_round), 3)]
            row[f"flop_ideal_{head}_over_softmax"] = round(flop_ideal, 3)
            row[f"fraction_of_flop_ideal_{head}"] = round(measured / flop_ideal, 3)


def engine_overhead(cfg, vocab_size: int, device: torch.device, batch_size: int, seq_len: int, repeats: int, warmup: int) -> dict:
    """The continuous model's step in a one-process DeepSpeed engine vs the bare PyTorch step."""
    import torch.distributed as dist

    started_here = not dist.is_initialized()
    # The rank variables the start exports are this function's own: the environment is restored after.
    with mock.patch.dict(os.environ):
        if started_here:  # one process, started as the trainer starts one (in-memory store, no MPI lookup)
            init_distributed(detect({}), backend="gloo" if device.type == "cpu" else "nccl")
        try:
            return _engine_vs_bare(cfg, vocab_size, device, batch_size, seq_len, repeats, warmup)
        finally:
            if started_here:
                dist.destroy_process_group()


def _engine_vs_bare(cfg, vocab_size: int, device: torch.device, batch_size: int, seq_len: int, repeats: int, warmup: int) -> dict:
    import deepspeed

    from pretrain.engine.trainer import deepspeed_config

    bare = TimedModel(cfg, vocab_size, device, batch_size, seq_len, "sparse" if cfg.train.sparse_embedding else "fused")
    wrapped = TimedModel(cfg, vocab_size, device, batch_size, seq_len, "sparse" if cfg.train.sparse_embedding else "fused")
    engine, _, _, _ = deepspeed.initialize(model=wrapped.model, optimizer=wrapped.optimizer, config=deepspeed_config(cfg))
    allreduce_skipped = skip_single_replica_allreduce(engine, cfg.train.zero_stage, 1)  # as the trainer does
    counter = _CollectiveCounter()

    def forward():
        wrapped.loss = engine(wrapped.batch)["loss"]

    def backward():
        engine.backward(wrapped.loss)

    def optimizer():
        engine.step()
    wrapped._forward, wrapped._backward, wrapped._optimizer = forward, backward, optimizer
    time_models({"bare": bare, "engine": wrapped}, repeats, warmup)
    with counter:
        wrapped.step(record=False)
    tokens = batch_size * seq_len
    bare_row, engine_row = bare.summary(tokens), wrapped.summary(tokens)
    return {"zero_stage": cfg.train.zero_stage, "single_replica_allreduce_skipped": allreduce_skipped, "bare": bare_row, "deepspeed": engine_row,
            "overhead_fraction": round(engine_row["step_ms"] / bare_row["step_ms"] - 1, 3),
            "collectives_per_step": counter.calls}


class _CollectiveCounter:
    """Counts torch.distributed collective calls (all_reduce, all_gather, broadcast, ...) inside a block."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor", "barrier")

    def __enter__(self):
        import torch.distributed as dist

        self.calls: dict[str, int] = {}
        self._saved = {name: getattr(dist, name) for name in self.NAMES}
        for name, fn in self._saved.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return counted

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)


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
    if args.repeats < MIN_REPEATS:
        raise ValueError(f"--repeats {args.repeats}: a median with [min, max] needs at least {MIN_REPEATS} repeats")
    if args.input_embedding == "targets" and args.optimizer == "sparse":
        raise ValueError("--input-embedding targets has no learned V x d_model table to update sparsely: "
                         "use --optimizer fused (or default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    common = [*args.overrides, f"model.objective={args.objective}", *OPTIMIZERS[args.optimizer],
              *INPUT_EMBEDDINGS[args.input_embedding]]
    base = load_config(args.config, common)
    seq_len = args.seq_len or base.model.max_seq_len
    allocator = pin_allocator()
    load_before = load_average()
    results = []
    for vocab in vocab_sizes:
        cfgs = {head: load_config(args.config, [*common, *HEADS[head]]) for head in heads}
        models = {head: TimedModel(cfg, vocab, device, args.batch_size, seq_len, args.optimizer) for head, cfg in cfgs.items()}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        time_models(models, args.repeats, args.warmup)
        sync(device)
        row = {"vocab_size": vocab, **{head: m.summary(args.batch_size * seq_len) for head, m in models.items()}}
        _ratio_row(row, models, cfgs, vocab, seq_len)
        results.append(row)
        del models
    out = {
        "suite": "train",
        "device": str(device),
        "clock": clock_name(device),
        "optimizer": args.optimizer,
        "input_embedding": args.input_embedding,
        "objective": args.objective,
        "loss": base.loss.name,
        "model": {k: getattr(base.model, k) for k in ("d_model", "n_layers", "n_heads", "d_ff")},
        "target_dim": base.targets.dim,
        "batch_size": args.batch_size,
        "seq_len": seq_len,
        "repeats": args.repeats,
        "cpu_threads": torch.get_num_threads(),
        "results": results,
    }
    if args.engine:
        cfg = load_config(args.config, [*common, *HEADS["continuous"]])
        out["engine"] = engine_overhead(cfg, vocab_sizes[-1], device, args.batch_size, seq_len, args.repeats, args.warmup)
    out["load_average"] = {"before": load_before, "after": load_average()}
    out["allocator_pinned"] = allocator
    return out
