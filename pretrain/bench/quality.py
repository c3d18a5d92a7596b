"""`pretrain bench quality`: is the continuous head as good as softmax? Measured so that it can be trusted.

For each corpus: one prepared dataset (tokenizer, shards) and one encoder configuration; every head
variant (softmax, adaptive softmax, continuous with several losses, fixed trained vs learned targets,
other target tables) is trained in this process with the same loop, data order and seed:

  equal tokens:     every variant trains --steps steps;
  equal wall-clock: every variant trains for the process CPU time softmax needed for --steps steps
                    (its own run, stopped when that time is spent; the learning-rate schedule follows
                    the share of the budget spent; process CPU time is steady on a shared machine).

All of them are scored on the SAME masked positions of the WHOLE validation split (the masks are
seeded per sequence, pretrain.evaluation.evaluate.corrupt_per_sequence; the study checks that the
targets are identical): top-1, top-5, a paired bootstrap 95% interval of the top-1 and top-5
difference to softmax, accuracy per frequency bucket (the 1% most frequent pieces, the next 9%, the
rest), accuracy without the most frequent piece, how often that piece is predicted vs its true share,
and the number of distinct pieces predicted. Continuous variants are also decoded hub-aware (CSLS
local scaling fitted on training-batch predictions, and an anti-frequency prior), at no extra search.

Downstream (the first corpus; every --task, pretrain.downstream.tasks): each chosen variant's encoder, pretrained
by a run of its own for --downstream-steps steps (0: its equal-time run), fine-tuned with scarce and more
labels over several seeds (--downstream-budget time: each for softmax's pretraining CPU time), against two controls: the same architecture from random weights, and from
random weights with the input embeddings set from the target table (no pretraining); the verdict says
whether the best continuous encoder beats softmax's and both controls by more than the seed spread.

Writes --out (JSON), quality.md and PNG plots next to it; --track logs them to MLflow.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pretrain.config import REPO_ROOT, load_config
from pretrain.downstream.tasks import DEFAULT_TASKS, Task, parse_tasks

HELP = "quality study: every head variant at equal tokens and equal CPU time, scored on the same masked positions"
DESCRIPTION = __doc__
log = logging.getLogger(__name__)

PYTHON_DOCS = "/usr/share/doc/python3.11/html/_sources"  # Debian python3.11-doc (PSF license): `make system-deps`
DEFAULT_CORPORA = [f"wordnet={REPO_ROOT / 'data' / 'corpus'}", f"python-docs={PYTHON_DOCS}"]
# name -> config overrides; "adaptive" marks the adaptive-softmax head (a softmax config underneath).
VARIANTS = {
    "softmax": ["model.head=softmax"],
    "adaptive_softmax": ["model.head=softmax", "adaptive"],
    "cosine": ["model.head=continuous", "loss.name=cosine"],
    "vmf_practice": ["model.head=continuous", "loss.name=vmf_practice"],
    "syn_margin": ["model.head=continuous", "loss.name=syn_margin_orth"],
    "learned_vmf": ["model.head=continuous", "loss.name=vmf_practice", "targets.learned=true"],
    # Row-sparse input embedding (and learned table) with the lazy row AdamW: the O(V) optimizer work gone.
    "learned_vmf_sparse": ["model.head=continuous", "loss.name=vmf_practice", "targets.learned=true",
                           "train.sparse_embedding=true", "train.zero_stage=0"],
    "adaptive_softmax_sparse": ["model.head=softmax", "adaptive", "train.sparse_embedding=true", "train.zero_stage=0"],
    "vmf_D128": ["model.head=continuous", "loss.name=vmf_practice", "targets.dim=128"],
}
# The study's scale (README "Accuracy: the quality study"): about 50 min on a busy 2-core CPU for the
# quality tables. Downstream encoders are pretrained longer (6000 steps: at 300 and 1500 pretraining did
# not beat the table-initialised control, at 3000 only by about the seed spread) and fine-tuned for 20 epochs (5 epochs = 15 optimizer steps at
# 20 labels per class: too few for any encoder); bench/quality-downstream{,-6000}/ have the measurements.
STUDY = {"bytes": 4_000_000, "steps": 300, "downstream_steps": 6000, "overrides": ["data.valid_fraction=0.05", "finetune.epochs=20"]}
SMALL = {"bytes": 300_000, "steps": 6, "downstream_steps": 8, "overrides": ["tokenizer.vocab_size=500", "targets.epochs=1", "model.d_model=32",
                                                        "model.d_ff=64", "model.n_layers=1", "targets.dim=16",
                                                        "train.micro_batch_size=8", "train.warmup_steps=2",
                                                        "finetune.epochs=1", "finetune.max_train_examples=40"]}
BUCKETS = (("top 1%", 0.01), ("next 9%", 0.10), ("rest", 1.0))  # by piece frequency rank in the train split
BOOTSTRAP = 1000
# Frequency prior of hub-aware decoding: score = cos + beta·log p; beta < 0 pushes away from frequent pieces
# (-0.05 already overwhelmed the cosines in the --small run: every prediction became a rare piece).
PRIOR_BETA = -0.01
MARKDOWN = "quality.md"
EXPORT_STAMP = "study-stamp.json"  # in a downstream encoder's export: the key of what pretrained it (--reuse-exports)
PRETRAINING_RECORD = "study-pretraining.json"  # beside it: that run's training record
PLOTS = {"time": "quality_top1_vs_cpu_time.png", "buckets": "quality_top1_per_frequency_bucket.png"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (default configs/tiny.yaml): encoder, tokenizer, targets, train lr")
    parser.add_argument("--corpus", action="append", default=None, metavar="NAME=PATH[:line|:blank_line]",
                        help="a corpus (file, directory or glob); ':blank_line' makes paragraphs the documents, ':line' "
                             "every line (the default except for the Python docs); repeatable "
                             f"(default: {' and '.join(c.split('=')[0] for c in DEFAULT_CORPORA)})")
    parser.add_argument("--variant", action="append", default=None, metavar="NAME[=KEY=VALUE,...]",
                        help=f"a head variant: one of {', '.join(VARIANTS)}, or NAME=overrides for a new one, e.g. "
                             "'vmf_d128=model.head=continuous,loss.name=vmf_practice,targets.dim=128' (default: all built-ins)")
    parser.add_argument("--steps", type=int, default=None, help=f"equal-token budget in optimizer steps (default {STUDY['steps']}; --small: {SMALL['steps']})")
    parser.add_argument("--max-time-factor", type=float, default=4.0, help="equal-time runs take at most this many times --steps")
    parser.add_argument("--small", action="store_true", help="CI size: 300 kB of each corpus, a tiny encoder, a few steps")
    parser.add_argument("--corpus-bytes", type=int, default=None, help=f"use only the first N bytes of each corpus (0: all; default "
                        f"{STUDY['bytes']:,}; --small: {SMALL['bytes']:,})")
    parser.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds per encoder and label budget (default 3; --small: 1)")
    parser.add_argument("--scarce-per-class", type=int, default=20, help="labels per class of the scarce fine-tuning setting")
    parser.add_argument("--many-per-class", type=int, default=100, help="labels per class of the larger setting (0: all labels)")
    parser.add_argument("--downstream-steps", type=int, default=None,
                        help="pretrain the downstream encoders (the --downstream variants) for this many steps, each its own run "
                             f"on the same data (default {STUDY['downstream_steps']}; --small: {SMALL['downstream_steps']}; 0: use the "
                             "equal-time runs' encoders)")
    parser.add_argument("--reuse-exports", action="store_true",
                        help="fine-tune a downstream encoder this study exported before (same --workdir) instead of pretraining "
                             "it again, when its variant config, steps and prepared data are the same: compare fine-tuning "
                             "recipes (finetune.* overrides) on the same encoders; the pretraining record is the earlier run's (with "
                             "--downstream-budget time the budget is softmax's CPU time for --downstream-steps, whatever it measured)")
    parser.add_argument("--downstream-budget", choices=["steps", "time"], default="steps",
                        help="steps: every downstream encoder pretrains --downstream-steps steps; time: softmax pretrains them first "
                             "and every other encoder until its process CPU time reaches softmax's (at most --max-time-factor x "
                             "the steps; its schedule planned from this run's equal-token timings): what a compute budget buys")
    parser.add_argument("--task", action="append", default=None, metavar="NAME[=TRAIN[,VALID]|=DIR]",
                        help="a labelled downstream task: wordnet-domains (shipped), fortunes (Debian `fortunes`: held-out "
                             "text), NAME=TRAIN[,VALID] (CSV/TSV/JSONL) or NAME=DIR (fortune files); repeatable "
                             f"(default: {' and '.join(DEFAULT_TASKS)}); finetune.* overrides set the recipe")
    parser.add_argument("--downstream", default="best", help="'best' (every softmax-head variant: softmax, adaptive softmax dense and sparse; and the continuous "
                        "variant with the best equal-time top-1), "
                        "'all', 'none', or comma-separated variant names")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is compute time on a shared machine)")
    parser.add_argument("--workdir", default="runs/bench-quality", help="prepared data, tables and fine-tuning runs")
    parser.add_argument("--out", default="bench/quality.json", help="JSON; quality.md and the plots go in its folder")
    parser.add_argument("--track", action="store_true", help="log the results, table and plots to MLflow")
    parser.add_argument("--tracking-uri", default=None, help="MLflow server (default: a local SQLite store in --store-dir)")
    parser.add_argument("--store-dir", default="bench/mlruns")
    parser.add_argument("--experiment", default="pretrain-bench")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every variant")


# Inputs ------------------------------------------------------------------------------------------

def parse_variants(specs: list[str] | None) -> dict[str, list[str]]:
    if not specs:
        return dict(VARIANTS)
    chosen = {}
    for spec in specs:
        name, _, overrides = spec.partition("=")
        if overrides:
            chosen[name] = overrides.split(",")
        elif name in VARIANTS:
            chosen[name] = VARIANTS[name]
        else:
            raise ValueError(f"--variant {spec!r}: not a built-in ({', '.join(VARIANTS)}); give NAME=KEY=VALUE,... for a new one")
    if "softmax" not in chosen:
        raise ValueError("--variant: softmax is the reference every difference is measured against; include it")
    return chosen


@dataclass
class Corpus:
    name: str
    paths: list[str]
    doc_separator: str


def parse_corpora(specs: list[str] | None) -> list[Corpus]:
    corpora = []
    for spec in specs or DEFAULT_CORPORA:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ValueError(f"--corpus {spec!r}: expected NAME=PATH (file, directory or glob)")
        # reST/markdown/prose is hard-wrapped: a paragraph (blank-line separated) is the document there.
        separator = "blank_line" if path == PYTHON_DOCS else "line"
        for choice in ("line", "blank_line"):
            if path.endswith(f":{choice}"):
                path, separator = path[: -len(choice) - 1], choice
        if not any(Path(p).exists() for p in [path]) and "*" not in path:
            hint = " (Debian package python3.11-doc: `make system-deps`)" if path == PYTHON_DOCS else ""
            raise FileNotFoundError(f"--corpus {name}: {path} not found{hint}; pass --corpus NAME=PATH for another corpus")
        corpora.append(Corpus(name, [path], separator))
    return corpora


def _read_text(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def truncated_corpus(corpus: Corpus, max_bytes: int, out_dir: Path) -> list[str]:
    """The first max_bytes of the corpus (files in sorted order, whole lines) as one file in out_dir."""
    from pretrain.data.corpus import resolve_corpus_files

    out_dir.mkdir(parents=True, exist_ok=True)
    out, chunks, size = out_dir / f"{corpus.name}.txt", [], 0
    for path in resolve_corpus_files(corpus.paths):
        text = _read_text(path)
        take = text[: max_bytes - size]
        chunks.append(take[: take.rfind(b"\n") + 1] if len(take) < len(text) else take)
        size += len(chunks[-1])
        if size >= max_bytes - 1:
            break
    out.write_bytes(b"\n\n".join(chunks))
    return [str(out)]


def _stamped(stamp_file: Path, key: dict, build) -> None:
    """Run build() unless stamp_file records the same key (a rerun reuses prepared data and tables)."""
    text = json.dumps(key, sort_keys=True, default=str)
    if stamp_file.is_file() and stamp_file.read_text() == text:
        return
    stamp_file.unlink(missing_ok=True)
    build()
    stamp_file.write_text(text)


def corpus_source(corpus: Corpus) -> dict:
    """What the corpus text was: sha256 over its files (sorted; each file's name and bytes), and the Debian
    package (with version) that installed each path, if one did - an upgrade of python3.11-doc changed
    the Python-docs figures once (V 14,359 -> 14,283) and nothing in the results said so."""
    from pretrain.data.corpus import resolve_corpus_files

    digest, files, size = hashlib.sha256(), resolve_corpus_files(corpus.paths), 0
    for path in files:
        data = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
        size += len(data)
    packages = {}
    if shutil.which("dpkg-query"):
        for path in corpus.paths:
            owner = subprocess.run(["dpkg-query", "-S", str(Path(path).resolve())], capture_output=True, text=True, timeout=60)
            for package in {line.split(":")[0] for line in owner.stdout.splitlines() if ":" in line} if owner.returncode == 0 else ():
                version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, timeout=60)
                packages[package] = version.stdout.strip() if version.returncode == 0 else "unknown"
    return {"sha256": digest.hexdigest(), "files": len(files), "bytes": size, "debian_packages": packages}


def prepare_corpus(base_cfg, corpus: Corpus, workdir: Path, max_bytes: int, source: dict):
    """The corpus' config (data prepared, counts of pieces in the train split). source (corpus_source):
    prepared data are reused only for the same corpus text."""
    from pretrain.data.prepare import prepare_dataset
    from pretrain.data.stream import iter_samples

    root = workdir / corpus.name
    paths = truncated_corpus(corpus, max_bytes, root / "corpus") if max_bytes else corpus.paths
    cfg = base_cfg.model_copy(deep=True)
    cfg.workdir = str(root)
    cfg.data.corpus = paths
    cfg.data.doc_separator = corpus.doc_separator
    cfg.data.dir = None
    cfg.targets.path = None
    key = {"data": cfg.data.model_dump(mode="json"), "tokenizer": cfg.tokenizer.model_dump(mode="json"), "bytes": max_bytes,
           "source_sha256": source["sha256"]}
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    _stamped(cfg.data_dir / "quality-stamp.json", key, lambda: prepare_dataset(cfg, progress=False))
    manifest = json.loads((cfg.data_dir / "manifest.json").read_text())
    counts = np.zeros(manifest["vocab_size"], dtype=np.int64)
    for tokens in iter_samples(cfg.data_dir, "train"):
        counts += np.bincount(tokens, minlength=len(counts))
    for special in manifest["special_ids"].values():
        counts[special] = 0  # pad/bos/mask are never targets
    return cfg, counts, manifest


def target_table(cfg) -> torch.Tensor:
    """The table for cfg.targets (built once per distinct targets section of this corpus)."""
    from pretrain.data.manifest import manifest_sha256
    from pretrain.targets.build import build_targets
    from pretrain.targets.table import load_target_table

    section = cfg.targets.model_dump(mode="json")
    table_key = {k: v for k, v in section.items() if not k.startswith(("learned", "contrastive", "vicreg", "ema"))}
    digest = _digest(table_key)
    cfg.targets.path = str(Path(cfg.workdir) / "targets" / digest / "targets.safetensors")
    Path(cfg.targets.path).parent.mkdir(parents=True, exist_ok=True)
    # Keyed by the prepared data's manifest too: re-prepared data (another tokenizer) needs a new table.
    _stamped(Path(cfg.targets.path).parent / "quality-stamp.json", {**table_key, "data": manifest_sha256(cfg.data_dir)},
             lambda: build_targets(cfg, progress=False))
    tokenizer_sha = json.loads((Path(cfg.data_dir) / "manifest.json").read_text())["tokenizer_sha256"]
    return load_target_table(cfg.targets.path, tokenizer_sha256=tokenizer_sha)[0]


def _digest(value: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


# Training ----------------------------------------------------------------------------------------

def variant_config(corpus_cfg, overrides: list[str]):
    """The corpus config with a variant's KEY=VALUE overrides (parsed as the command line's are)."""
    from pretrain.config import apply_overrides, config_from_dict

    raw = apply_overrides(corpus_cfg.to_dict(), [item for item in overrides if item != "adaptive"])
    return config_from_dict(raw, source="pretrain bench quality --variant")


def build_variant(cfg, overrides: list[str], vocab_size: int, table: torch.Tensor, counts: np.ndarray, special_ids: dict):
    from pretrain.model import build_model
    from pretrain.model.heads import AdaptiveSoftmaxHead

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, vocab_size, table, special_ids=special_ids)
    if "adaptive" in overrides:
        model.head = AdaptiveSoftmaxHead(cfg.model.d_model, torch.from_numpy(counts))
    return model


def train(model, cfg, steps: int, desc: str = "train", cpu_budget_s: float | None = None, max_steps: int | None = None) -> dict:
    """Plain single-process training with the trainer's optimizer (pretrain.engine.optim: fused AdamW;
    with train.sparse_embedding the lazy row update of the vocabulary tables), warm-up + decay lr and
    clipping: the same loop, data order and masks for every variant. Returns the steady process CPU
    seconds: those of steps 2.. scaled to all steps (step 1 pays one-off costs - lazy imports of a
    head's code path, the loader's shuffle buffer - which at the study's few hundred steps favoured
    whichever variant ran after another had paid them); first_step_cpu_s is step 1's own.

    cpu_budget_s (equal time): train until that steady CPU time is spent (the first step at which it is
    reached is the last; at most max_steps) instead of for `steps`, which then only plans the schedule:
    the learning rate follows the share of the budget spent by the end of each step, so the warm-up and
    the decay span the budget whatever a step turns out to cost. (Steps planned from an earlier timing
    were up to 13% off: the per-step cost drifts over a long run.)
    A progress bar (train.progress) names `desc`: a downstream encoder's run takes half an hour on a CPU."""
    from tqdm.auto import tqdm

    from pretrain.data.stream import build_loader
    from pretrain.engine.optim import build_optimizer, clip_grad_norm
    from pretrain.engine.schedule import lr_at, set_lr
    from pretrain.model import batch_generator

    tc = cfg.train
    loader = build_loader(cfg.data_dir, "train", batch_size=tc.micro_batch_size, rank=0, world_size=1, num_workers=0,
                          seed=cfg.data.seed, shuffle_buffer=cfg.data.shuffle_buffer)
    optimizer = build_optimizer(model.param_groups(tc.weight_decay, tc.lr), tc)
    model.train()
    batches = iter(loader)
    losses = []
    last = steps if cpu_budget_s is None else (max_steps or 100 * steps)
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not tc.progress, mininterval=5.0)
    start = first_done = time.process_time()
    step = 0
    while step < last:
        step += 1
        if step == 2:
            first_done = time.process_time()
        position = step
        if cpu_budget_s is not None and step > 2:  # steady CPU of steps 2..step-1, projected to the end of this step
            projected = (time.process_time() - first_done) * step / (step - 2)
            position = max(1, min(steps, round(steps * projected / cpu_budget_s)))
        set_lr(optimizer, lr_at(position, base_lr=tc.lr, warmup_steps=min(tc.warmup_steps, steps // 2), total_steps=steps,
                                min_lr_ratio=tc.min_lr_ratio))
        batch = model.objective(next(batches), batch_generator(tc.seed, step, 0, 0))
        loss = model(batch)["loss"]
        if not torch.isfinite(loss):
            raise ValueError(f"loss became {loss.item()} at step {step}: lower train.lr (now {tc.lr}) for this variant")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            clip_grad_norm([p.grad for p in model.parameters() if p.grad is not None], tc.grad_clip)
        optimizer.step()
        model.after_optimizer_step()
        losses.append(loss.item())
        bar.update()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4g}", refresh=False)
        if cpu_budget_s is not None and step > 1 and (time.process_time() - first_done) * step / (step - 1) >= cpu_budget_s:
            break
    end = time.process_time()
    bar.close()
    cpu = (end - first_done) * step / (step - 1) if step > 1 else end - start
    model.eval()
    record = {"steps": step, "cpu_s": round(cpu, 3), "first_step_cpu_s": round((first_done if step > 1 else end) - start, 3),
              "final_loss": round(float(np.mean(losses[-max(1, step // 10):])), 4)}
    if cpu_budget_s is not None:
        record.update(cpu_budget_s=round(cpu_budget_s, 3), planned_steps=steps)
    return record


# Scoring -----------------------------------------------------------------------------------------

@torch.no_grad()
def head_outputs(model, cfg, split: str, max_batches: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Head outputs and target ids at the masked positions of the whole split (eval.seed masks)."""
    from pretrain.data.stream import build_loader
    from pretrain.evaluation.evaluate import corrupt_per_sequence
    from pretrain.model import IGNORE_INDEX

    loader = build_loader(cfg.data_dir, split, batch_size=cfg.eval.batch_size, rank=0, world_size=1, num_workers=0,
                          seed=cfg.data.seed, epochs=1)
    outputs, targets = [], []
    for n, raw in enumerate(loader):
        if max_batches and n >= max_batches:
            break
        batch = corrupt_per_sequence(model.objective, raw, cfg.eval.seed)
        hidden = model.encode(batch["input_ids"], batch["doc_ids"])
        labels = batch["labels"].reshape(-1)
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        out = hidden.reshape(-1, hidden.shape[-1])[rows]
        outputs.append(model.head(out).float())
        targets.append(labels[rows])
    return torch.cat(outputs), torch.cat(targets)


def decodings(model, cfg, counts: np.ndarray, outputs: torch.Tensor, beta: float = PRIOR_BETA) -> dict[str, tuple[torch.Tensor, float]]:
    """(top-5 ids, decode CPU seconds) per decoding: argmax (softmax heads), or nearest neighbour plain /
    CSLS / frequency prior (the hub-aware ones re-rank a wider FAISS list: their extra cost shows here)."""
    from pretrain.evaluation.decoder import NearestNeighbourDecoder, csls_bias, frequency_prior_bias

    if not model.continuous:
        start = time.process_time()
        top5 = outputs.topk(5, dim=-1).indices
        return {"": (top5, time.process_time() - start)}
    table = model.target_table
    fit_on, _ = head_outputs(model, cfg, "train", max_batches=20)  # no labels used: only the predictions' geometry
    biases = {"": None, "+csls": csls_bias(table, fit_on), "+prior": frequency_prior_bias(counts, beta)}
    out = {}
    for suffix, bias in biases.items():
        decoder = NearestNeighbourDecoder(table, device="cpu", hub_bias=bias)
        start = time.process_time()
        top5 = decoder.search(outputs, 5)[1]
        out[suffix] = (top5, time.process_time() - start)
        log.info("decode%s: %.2f s CPU for %d vectors", suffix or " (plain)", out[suffix][1], len(outputs))
    return out


def bucket_of_ids(counts: np.ndarray) -> np.ndarray:
    """Frequency bucket index per piece id: 0 = the 1% most frequent pieces, 1 = the next 9%, 2 = the rest."""
    order = np.argsort(-counts, kind="stable")
    bucket = np.empty(len(counts), dtype=np.int64)
    start = 0
    for b, (_, share) in enumerate(BUCKETS):
        stop = max(start + 1, int(round(share * len(counts)))) if b < len(BUCKETS) - 1 else len(counts)
        bucket[order[start:stop]] = b
        start = stop
    return bucket


def score(top5: torch.Tensor, targets: torch.Tensor, counts: np.ndarray) -> dict:
    """Accuracy figures of one variant's top-5 ids [N, 5] against targets [N]."""
    top5, targets = top5.numpy(), targets.numpy()
    hits1 = top5[:, 0] == targets
    frequent = int(np.argmax(counts))
    bucket = bucket_of_ids(counts)[targets]
    others = targets != frequent
    return {
        "positions": int(len(targets)),
        "top1": float(hits1.mean()),
        "top5": float((top5 == targets[:, None]).any(1).mean()),
        "top1_by_bucket": {name: (float(hits1[bucket == b].mean()) if (bucket == b).any() else None) for b, (name, _) in enumerate(BUCKETS)},
        "top1_without_most_frequent": float(hits1[others].mean()) if others.any() else None,
        "most_frequent_predicted_share": float((top5[:, 0] == frequent).mean()),
        "most_frequent_true_share": float((~others).mean()),
        "distinct_predicted": int(len(np.unique(top5[:, 0]))),
    }


def paired_bootstrap(hits: np.ndarray, reference: np.ndarray, seed: int = 0, rounds: int = BOOTSTRAP) -> dict:
    """Mean difference of two per-position 0/1 hit vectors and its 95% percentile interval, resampling
    positions with replacement (both variants on the same resampled positions: paired)."""
    diff = hits.astype(np.float64) - reference.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(rounds)])
    low, high = np.percentile(means, [2.5, 97.5])
    return {"diff": float(diff.mean()), "ci95": [float(low), float(high)]}


def softmax_family(rows: dict[str, dict]) -> list[str]:
    """The rows of softmax heads (full, adaptive, any variant of them): the peers of the continuous ones."""
    return [name for name, row in rows.items() if row["decoding"] == "argmax"]


def compare_to_peers(rows: dict[str, dict], hits: dict[str, dict[str, np.ndarray]]) -> None:
    """Paired differences of every row to softmax and of every continuous row to each other softmax-head
    variant that ran (adaptive softmax, dense and sparse: the peers it must beat on speed at equal quality)."""
    family = softmax_family(rows)
    for name, row in rows.items():
        for peer in ("softmax",) if name in family else family:
            if peer in hits and peer != row["base_variant"]:
                row[f"vs_{peer}"] = {k: paired_bootstrap(hits[name][k], hits[peer][k]) for k in ("top1", "top5")}


# Downstream --------------------------------------------------------------------------------------

def export_encoder(model, cfg, out_dir: Path, table_path: str) -> Path:
    """The encoder as a `pretrain export` directory (a softmax model carries it: the head is unused)."""
    from pretrain.data.manifest import load_manifest
    from pretrain.downstream.export import TOKENIZER_FILE, with_learned_input_embedding, write_export
    model, cfg = with_learned_input_embedding(model, cfg)  # a table-input encoder as an ordinary one
    carrier_cfg = cfg.model_copy(deep=True)
    carrier_cfg.model.head = "softmax"
    carrier_cfg.model.tie_softmax = False
    carrier_cfg.targets.learned = False
    manifest = load_manifest(cfg.data_dir)
    carrier = _carrier(carrier_cfg, manifest)
    carrier.encoder.load_state_dict(model.encoder.state_dict())
    return write_export(out_dir, state_dict=carrier.state_dict(), config=carrier_cfg.to_dict(), vocab_size=manifest["vocab_size"],
                        tokenizer_path=cfg.data_dir / TOKENIZER_FILE, targets_path=table_path,
                        extra={"special_ids": manifest["special_ids"]})


def _carrier(cfg, manifest):
    from pretrain.model import build_model

    build = cfg.model_copy(deep=True)
    build.model.init_embeddings_from_targets = False  # the weights are replaced anyway
    return build_model(build, manifest["vocab_size"], special_ids=manifest["special_ids"])


def downstream(encoders: dict[str, Path], cfg, task: Task, workdir: Path, seeds: int, scarce_per_class: int, many_per_class: int = 0) -> dict:
    """Fine-tuning accuracy on `task` (mean, spread = max - min over seeds) per encoder and label budget;
    'random init' is the first encoder's architecture from random weights (finetune --from-scratch).
    The TF-IDF + logistic regression row (same rows and seeds, fitted beside the first encoder's runs) says
    how much of the task plain word overlap solves."""
    from pretrain.downstream.classify import label_vocabulary, read_labelled
    from pretrain.downstream.finetune import finetune

    ft_cfg = cfg.model_copy(deep=True)
    ft_cfg.tracking.enabled = False
    ft_cfg.finetune.train_file = str(task.train_file)
    ft_cfg.finetune.valid_file = str(task.valid_file or "")
    if task.valid_file is None:
        ft_cfg.finetune.valid_fraction = ft_cfg.finetune.valid_fraction or 0.2
    train_rows = read_labelled(task.train_file, ft_cfg.finetune.text_field, ft_cfg.finetune.label_field, key="--task")
    classes = len(label_vocabulary(train_rows))
    budgets = {f"{scarce_per_class} per class": scarce_per_class * classes,
               f"{many_per_class} per class" if many_per_class else "all labels": many_per_class * classes}
    first = next(iter(encoders.values()))
    runs = {**{name: (path, False) for name, path in encoders.items()}, "control: random init": (first, True)}
    results, lexical = {}, {}
    for name, (init_dir, scratch) in runs.items():
        results[name] = {}
        for budget, rows in budgets.items():
            accs = []
            ft_cfg.finetune.tfidf_baseline = name == next(iter(runs))
            for seed in range(seeds):
                ft_cfg.finetune.seed = seed
                ft_cfg.finetune.max_train_examples = rows
                report = finetune(ft_cfg, init_dir, workdir / "finetune" / task.name / _slug(name) / _slug(budget) / str(seed),
                                  from_scratch=scratch)
                accs.append(report["accuracy"])
                if report.get("tfidf_baseline"):
                    lexical.setdefault(budget, []).append(report["tfidf_baseline"]["accuracy"])
            results[name][budget] = _spread(accs)
    if lexical:
        results[TFIDF] = {budget: _spread(accs) for budget, accs in lexical.items()}
    return results


TFIDF = "reference: TF-IDF + logistic regression"


def _spread(accs: list[float]) -> dict:
    return {"mean": float(np.mean(accs)), "spread": float(np.max(accs) - np.min(accs)), "accuracies": accs}


PEERS = ("softmax", "adaptive_softmax")


def downstream_verdict(results: dict, peers=PEERS) -> dict | None:
    """The best continuous encoder (highest mean accuracy over the label budgets) against softmax and both
    controls, per budget: the gap of the means and whether it exceeds the seed spread (the larger of the
    two encoders' max - min). goal_met: it beats every one of them in every budget. peers: the
    softmax-head variants (not candidates for the best continuous encoder)."""
    continuous = [n for n in results if n not in peers and not n.startswith(("control", "reference"))]
    if not continuous:
        return None
    best = max(continuous, key=lambda n: np.mean([b["mean"] for b in results[n].values()]))
    against = [n for n in results if n in ("softmax", *(c for c in results if c.startswith("control")))]
    rows = {}
    for other in against:
        rows[other] = {}
        for budget, mine in results[best].items():
            theirs = results[other][budget]
            gap = mine["mean"] - theirs["mean"]
            rows[other][budget] = {"gap": gap, "spread": max(mine["spread"], theirs["spread"]),
                                   "beats": bool(gap > max(mine["spread"], theirs["spread"]))}
    return {"encoder": best, "against": rows, "goal_met": all(b["beats"] for r in rows.values() for b in r.values())}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


# The study ---------------------------------------------------------------------------------------

def run_corpus(corpus: Corpus, base_cfg, variants: dict[str, list[str]], args, steps: int, max_bytes: int) -> dict:
    source = corpus_source(corpus)
    cfg, counts, manifest = prepare_corpus(base_cfg, corpus, Path(args.workdir), max_bytes, source)
    vocab, special = manifest["vocab_size"], manifest["special_ids"]
    log.info("quality: corpus %s, %d train tokens, V=%d", corpus.name, int(counts.sum()), vocab)
    budgets = {"equal_tokens": {}, "equal_time": {}}
    hits: dict[str, dict[str, dict[str, np.ndarray]]] = {"equal_tokens": {}, "equal_time": {}}
    reference_targets = None
    kept_models = {}
    softmax_cpu = None
    ordered = ["softmax", *[v for v in variants if v != "softmax"]]
    for name in ordered:
        vcfg = variant_config(cfg, variants[name])
        table = target_table(vcfg)
        runs = {}
        model = build_variant(vcfg, variants[name], vocab, table, counts, special)
        runs["equal_tokens"] = (model, train(model, vcfg, steps, f"{corpus.name} {name} (equal tokens)"))
        if softmax_cpu is None:
            softmax_cpu = runs["equal_tokens"][1]["cpu_s"]
        time_steps = planned_steps(steps, softmax_cpu, runs["equal_tokens"][1]["cpu_s"], args.max_time_factor)
        if abs(time_steps - steps) <= 0.05 * steps:
            runs["equal_time"] = runs["equal_tokens"]
        else:
            model = build_variant(vcfg, variants[name], vocab, table, counts, special)
            runs["equal_time"] = (model, train(model, vcfg, time_steps, f"{corpus.name} {name} (equal time)",
                                               cpu_budget_s=softmax_cpu, max_steps=int(args.max_time_factor * steps)))
        for budget, (model, training) in runs.items():
            log.info("quality: %s %s: %s", corpus.name, name, training)
            outputs, targets = head_outputs(model, vcfg, "valid")
            if reference_targets is None:
                reference_targets = targets
            elif not torch.equal(targets, reference_targets):
                raise RuntimeError(f"{name}: the validation targets differ from softmax's; the masks must be identical")
            for suffix, (top5, decode_cpu_s) in decodings(model, vcfg, counts, outputs).items():
                row = {"variant": name + suffix, "base_variant": name, "decoding": suffix.strip("+") or ("argmax" if not model.continuous else "nearest"),
                       "overrides": variants[name], "training": training, "decode_cpu_s": round(decode_cpu_s, 3),
                       **score(top5, targets, counts)}
                budgets[budget][name + suffix] = row
                hits[budget][name + suffix] = {"top1": (top5[:, 0] == targets).numpy(),
                                               "top5": (top5 == targets[:, None]).any(1).numpy()}
            if budget == "equal_time":
                kept_models[name] = (model, vcfg, training)
    for budget in budgets:
        compare_to_peers(budgets[budget], hits[budget])
    result = {"corpus": corpus.name, "paths": corpus.paths, "source": source, "doc_separator": corpus.doc_separator, "vocab_size": vocab,
              "train_tokens": int(counts.sum()), "valid_positions": int(len(reference_targets)), "steps": steps,
              "softmax_cpu_s": softmax_cpu, "most_frequent_piece": _piece(cfg, int(np.argmax(counts))), "budgets": budgets}
    return result, kept_models, cfg, counts, manifest


def _piece(cfg, piece_id: int) -> str:
    from pretrain.data.tokenizer import load_tokenizer

    return load_tokenizer(cfg.data_dir / "tokenizer.model").id_to_piece(piece_id)


def planned_steps(steps: int, softmax_cpu_s: float, variant_cpu_s: float, max_factor: float) -> int:
    """The steps a variant is expected to fit in softmax's CPU time for `steps` steps, from both runs' CPU
    time for them (measured side by side): it plans an equal-time run's schedule, the budget ends it."""
    return max(1, min(int(round(steps * softmax_cpu_s / max(variant_cpu_s, 1e-9))), int(max_factor * steps)))


def downstream_steps(chosen: list[str], equal_tokens: dict, steps: int, budget: str, max_factor: float) -> dict[str, int]:
    """Pretraining steps per downstream encoder: `steps` each (budget 'steps'), or (budget 'time') the
    planned steps in softmax's CPU time for `steps` (from this run's equal-token rows); the run itself
    stops when softmax's measured CPU time is spent (downstream_encoders)."""
    if budget == "steps" or not steps:
        return {v: steps for v in chosen}
    softmax_cpu = equal_tokens["softmax"]["training"]["cpu_s"]
    return {v: planned_steps(steps, softmax_cpu, equal_tokens[v]["training"]["cpu_s"], max_factor) for v in chosen}


def downstream_encoders(chosen: list[str], models: dict, cfg, variants: dict[str, list[str]], steps: dict[str, int], counts: np.ndarray,
                        manifest: dict, root: Path, reuse: bool = False, budget: str = "steps", max_factor: float = 4.0) -> dict[str, tuple[Path, dict]]:
    """(export directory under root, training record) per downstream variant: its equal-time run's encoder
    (steps 0), or a run of its own with the same loop, data and seed (the quality tables stay at the study's
    budget): steps[variant] steps, or (budget 'time') softmax's - pretrained first - for steps['softmax'],
    the others then training until their process CPU time reaches the CPU time softmax's run measured.
    reuse: an export whose EXPORT_STAMP has the same key (variant config, budget, prepared data) is taken as
    it is; its record is the earlier run's, marked 'reused'."""
    from pretrain.data.manifest import manifest_sha256

    timed = budget == "time" and any(steps.values())
    if timed and "softmax" not in chosen:
        raise ValueError(f"--downstream-budget time pretrains every encoder for softmax's CPU time: add softmax to --downstream (now {chosen})")
    out = {}
    for v in (["softmax", *[c for c in chosen if c != "softmax"]] if timed else chosen):
        stamp = root / v / EXPORT_STAMP
        if not steps[v]:
            model, vcfg, training = models[v]
            stamp.unlink(missing_ok=True)
            out[v] = (export_encoder(model, vcfg, root / v, vcfg.targets.path), training)
            continue
        vcfg = variant_config(cfg, variants[v])
        table = target_table(vcfg)
        pretraining_cfg = {section: value for section, value in vcfg.to_dict().items() if section not in ("finetune", "tracking")}
        cpu_budget = out["softmax"][1]["cpu_s"] if timed and v != "softmax" else None
        # Equal time: the budget is "softmax's CPU time for its steps" (its measured seconds vary run to run).
        amount = {"cpu_time_of_softmax_steps": steps["softmax"]} if cpu_budget else {"steps": steps[v]}
        key = {"config": pretraining_cfg, "overrides": variants[v], **amount, "data": manifest_sha256(cfg.data_dir)}
        record = root / v / PRETRAINING_RECORD
        pretrained = []

        def pretrain_and_export():
            if reuse:
                log.info("quality: downstream encoder %s: no earlier export with the same config, budget and data in %s; pretraining it", v, root / v)
            model = build_variant(vcfg, variants[v], manifest["vocab_size"], table, counts, manifest["special_ids"])
            training = train(model, vcfg, steps[v], f"downstream encoder {v}", cpu_budget_s=cpu_budget,
                             max_steps=int(max_factor * steps["softmax"]) if cpu_budget else None)
            log.info("quality: downstream encoder %s: %s", v, training)
            export_encoder(model, vcfg, root / v, vcfg.targets.path)
            record.write_text(json.dumps(training))
            pretrained.append(v)

        if not reuse:
            stamp.unlink(missing_ok=True)  # pretrain again whatever an earlier run left
        _stamped(stamp, key, pretrain_and_export)  # the stamp is written after the export: a half-written one is never reused
        training = json.loads(record.read_text())
        if not pretrained:
            log.info("quality: downstream encoder %s: reusing %s (--reuse-exports): pretrained %s", v, root / v, training)
            training["reused"] = str(root / v)
        out[v] = (root / v, training)
    return {v: out[v] for v in chosen}


def downstream_choice(spec: str, equal_time: dict) -> list[str]:
    base = {row["base_variant"] for row in equal_time.values()}
    if spec == "none":
        return []
    if spec == "all":
        return sorted(base)
    if spec == "best":  # every softmax-head variant that ran (the token table's peers) and the best continuous one
        continuous = [r for r in equal_time.values() if r["decoding"] == "nearest"]
        best = [max(continuous, key=lambda r: r["top1"])["base_variant"]] if continuous else []
        return [*softmax_family(equal_time), *best]
    chosen = [v.strip() for v in spec.split(",") if v.strip()]
    unknown = sorted(set(chosen) - base)
    if unknown:
        raise ValueError(f"--downstream: unknown variants {unknown}; trained: {sorted(base)}")
    return chosen


def run(args: argparse.Namespace) -> dict:
    from pretrain.bench import report

    torch.set_num_threads(max(1, args.threads))
    variants = parse_variants(args.variant)
    corpora = parse_corpora(args.corpus)
    size = SMALL if args.small else STUDY
    overrides = [*STUDY["overrides"], *(SMALL["overrides"] if args.small else []), *args.overrides]
    base_cfg = load_config(args.config, overrides)
    steps = args.steps or size["steps"]
    max_bytes = size["bytes"] if args.corpus_bytes is None else args.corpus_bytes
    seeds = args.seeds or (1 if args.small else 3)
    pretrain_steps = size["downstream_steps"] if args.downstream_steps is None else args.downstream_steps
    tasks = parse_tasks(args.task, Path(args.workdir)) if args.downstream != "none" else []  # before hours of training
    started = time.perf_counter()
    results = {"suite": "quality", "hardware": report.hardware_info(), "small": args.small, "steps": steps,
               "torch_threads": torch.get_num_threads(), "overrides": overrides,
               "model": {k: getattr(base_cfg.model, k) for k in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len")},
               "corpora": {}}
    for n, corpus in enumerate(corpora):
        result, models, cfg, counts, manifest = run_corpus(corpus, base_cfg, variants, args, steps, max_bytes)
        if n == 0 and args.downstream != "none":
            chosen = downstream_choice(args.downstream, result["budgets"]["equal_time"])
            root = Path(args.workdir) / corpus.name / "exports"
            steps_of = downstream_steps(chosen, result["budgets"]["equal_tokens"], pretrain_steps, args.downstream_budget, args.max_time_factor)
            pretrained = downstream_encoders(chosen, models, cfg, variants, steps_of, counts, manifest, root, args.reuse_exports,
                                             args.downstream_budget, args.max_time_factor)
            encoders = {v: path for v, (path, _) in pretrained.items()}
            # Control 2: random weights, input embeddings from the (first fixed) target table, no training.
            table_cfg = variant_config(cfg, VARIANTS["vmf_practice"])
            table_cfg.model.init_embeddings_from_targets = True
            untrained = build_variant(table_cfg, [], result["vocab_size"], target_table(table_cfg), None, None)
            encoders["control: table embeddings, no pretraining"] = export_encoder(untrained, table_cfg, root / "table-init", table_cfg.targets.path)
            result["downstream"] = {"seeds": seeds, "epochs": cfg.finetune.epochs, "budget": args.downstream_budget,
                                    "finetune": {k: getattr(cfg.finetune, k) for k in ("epochs", "lr", "encoder_lr_scale", "pooling", "batch_size")},
                                    "pretraining": {v: training for v, (_, training) in pretrained.items()}, "tasks": {}}
            for task in tasks:
                scores = downstream(encoders, cfg, task, Path(args.workdir) / corpus.name, seeds, args.scarce_per_class, args.many_per_class)
                result["downstream"]["tasks"][task.name] = {**task.as_dict(), "results": scores, "verdict": downstream_verdict(scores, softmax_family(result["budgets"]["equal_time"]))}
        results["corpora"][corpus.name] = result
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_outputs(results, Path(args.out), args)
    return results


# Report ------------------------------------------------------------------------------------------

def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _ci(vs: dict | None) -> str:
    if not vs:
        return "(reference)"
    return f"{100 * vs['diff']:+.1f} [{100 * vs['ci95'][0]:+.1f}, {100 * vs['ci95'][1]:+.1f}]"


def markdown(results: dict) -> str:
    from pretrain.bench.report import hardware_line

    lines = ["# `pretrain bench quality`", "",
             f"Hardware: {hardware_line(results['hardware'])}; torch threads {results['torch_threads']}. "
             f"Encoder {results['model']}; {results['steps']} steps = the equal-token budget; equal time = softmax's process CPU time "
             "for those steps. Top-1/top-5 in %, on every masked position of the whole validation split (identical for all "
             "variants); Δ vs softmax with a paired bootstrap 95% interval (points)."]
    for name, corpus in results["corpora"].items():
        lines += ["", f"## Corpus: {name} ({corpus['train_tokens']:,} train tokens, V={corpus['vocab_size']}, "
                      f"{corpus['valid_positions']:,} scored positions, documents split by {corpus['doc_separator']})", ""]
        if "source" in corpus:  # (results written before the source was recorded lack it)
            source = corpus["source"]
            packages = "".join(f", Debian {p} {v}" for p, v in source["debian_packages"].items())
            lines += [f"Text: {source['files']} files, {source['bytes']:,} bytes, sha256 {source['sha256'][:16]}…{packages}.", ""]
        for budget, rows in corpus["budgets"].items():
            lines += [f"### {budget.replace('_', ' ')}", "",
                      "| variant | steps | CPU s | top-1 | Δ top-1 vs softmax [95% CI] | top-5 | Δ top-5 [95% CI] | "
                      "top 1% / next 9% / rest | top-1 w/o most frequent | predicted / true share of "
                      f"`{corpus['most_frequent_piece']}` | distinct predicted |",
                      "|---|---:|---:|---:|---|---:|---|---|---:|---|---:|"]
            for row in rows.values():
                vs = row.get("vs_softmax", {})
                buckets = " / ".join(_pct(v) for v in row["top1_by_bucket"].values())
                lines.append(f"| {row['variant']} | {row['training']['steps']} | {row['training']['cpu_s']:.1f} | {_pct(row['top1'])} | "
                             f"{_ci(vs.get('top1'))} | {_pct(row['top5'])} | {_ci(vs.get('top5'))} | {buckets} | "
                             f"{_pct(row['top1_without_most_frequent'])} | {_pct(row['most_frequent_predicted_share'])} / "
                             f"{_pct(row['most_frequent_true_share'])} | {row['distinct_predicted']} |")
            for peer in [p for p in softmax_family(rows) if p != "softmax"]:  # (the table has the softmax columns)
                versus = [row for row in rows.values() if f"vs_{peer}" in row]
                if versus:
                    lines += ["", f"Δ vs {peer.replace('_', ' ')}, paired 95% interval (points): " + "; ".join(
                        f"{row['variant']} top-1 {_ci(row[f'vs_{peer}']['top1'])}, top-5 {_ci(row[f'vs_{peer}']['top5'])}"
                        for row in versus)]
            lines.append("")
        ds = corpus.get("downstream", {})
        for task_name, task in ds.get("tasks", {}).items():
            budgets = list(next(iter(task["results"].values())))
            steps_of = ", ".join(f"{v} {t['steps']} ({t['cpu_s']:.0f} CPU s{', reused' if t.get('reused') else ''})"
                                 for v, t in ds["pretraining"].items())
            if ds.get("budget") == "time":
                steps_of += " - equal process CPU time (--downstream-budget time: each run stopped when softmax's CPU time was spent)"
            recipe = ", ".join(f"{k} {v}" for k, v in ds["finetune"].items())
            lines += [f"### Downstream task {task_name}: fine-tuned on {task['train_file']} ({ds['seeds']} seeds; {recipe}; "
                      "accuracy mean ± spread = max − min)", "",
                      f"Task source: {task['source']}. Pretraining steps of the encoders (on {name}): "
                      f"{steps_of or 'the equal-time runs'}; the controls are not pretrained.", "",
                      "| encoder | " + " | ".join(budgets) + " |", "|---|" + "---:|" * len(budgets)]
            for enc, by_budget in task["results"].items():
                lines.append(f"| {enc} | " + " | ".join(f"{100 * by_budget[b]['mean']:.1f} ± {100 * by_budget[b]['spread']:.1f}" for b in budgets) + " |")
            verdict = task["verdict"]
            if verdict:
                lines += ["", f"Best continuous encoder ({verdict['encoder']}), gap of the means in points (beats: the gap exceeds "
                              "the larger seed spread):", ""]
                for other, by_budget in verdict["against"].items():
                    lines.append(f"- vs {other}: " + "; ".join(f"{b} {100 * v['gap']:+.1f} (spread {100 * v['spread']:.1f}, "
                                                              f"{'beats' if v['beats'] else 'does not beat'})" for b, v in by_budget.items()))
                lines += ["", f"**Downstream goal on {task_name} (beats softmax and both controls by more than the seed spread, "
                              f"every label budget): {'met' if verdict['goal_met'] else 'not met'}.**", ""]
    lines += ["", f"Study time {results['seconds']} s."]
    return "\n".join(lines) + "\n"


def write_plots(results: dict, out_dir: Path) -> list[Path]:
    from matplotlib.figure import Figure

    corpora = results["corpora"]
    fig = Figure(figsize=(6 * len(corpora), 4.5), layout="constrained")
    axes = fig.subplots(1, len(corpora), squeeze=False)[0]
    for ax, (name, corpus) in zip(axes, corpora.items()):
        for variant, row in corpus["budgets"]["equal_tokens"].items():
            if row["decoding"] in ("csls", "prior"):  # same training as the plain row: only the decoding differs
                continue
            points = [(corpus["budgets"][b][variant]["training"]["cpu_s"], 100 * corpus["budgets"][b][variant]["top1"]) for b in ("equal_tokens", "equal_time")]
            ax.plot(*zip(*points), marker="o" if "softmax" in variant else "^", label=variant)
        ax.axvline(corpus["softmax_cpu_s"], color="grey", linewidth=0.8, linestyle=":")
        ax.set(title=f"{name}: top-1 vs training CPU time", xlabel="process CPU seconds (equal tokens, equal time)", ylabel="top-1 %")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{results['hardware'].get('cpu', '')}, {results['hardware'].get('cores', '?')} cores, torch threads "
                 f"{results['torch_threads']}; {results['steps']} steps = equal tokens", fontsize=8)
    time_plot = out_dir / PLOTS["time"]
    fig.savefig(time_plot, dpi=110)

    fig = Figure(figsize=(6 * len(corpora), 4.5), layout="constrained")
    axes = fig.subplots(1, len(corpora), squeeze=False)[0]
    for ax, (name, corpus) in zip(axes, corpora.items()):
        rows = list(corpus["budgets"]["equal_time"].values())
        width = 0.8 / max(len(rows), 1)
        for i, row in enumerate(rows):
            values = [100 * (v or 0) for v in row["top1_by_bucket"].values()]
            ax.bar(np.arange(len(values)) + i * width, values, width, label=row["variant"])
        ax.set_xticks(np.arange(len(BUCKETS)) + 0.4 - width / 2, [b for b, _ in BUCKETS])
        ax.set(title=f"{name}: top-1 per frequency bucket (equal time)", ylabel="top-1 %")
    axes[0].legend(fontsize=7)
    bucket_plot = out_dir / PLOTS["buckets"]
    fig.savefig(bucket_plot, dpi=110)
    return [time_plot, bucket_plot]


def write_outputs(results: dict, out: Path, args) -> list[Path]:
    from pretrain.bench import report

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    (out.parent / MARKDOWN).write_text(markdown(results))
    files = [out, out.parent / MARKDOWN, *write_plots(results, out.parent)]
    if args.track:
        run_id, _ = report.track({"hardware": results["hardware"], "suites": {"quality": results}}, files, args.store_dir,
                                 tracking_uri=args.tracking_uri, experiment=args.experiment)
        log.info("MLflow run %s", run_id)
    return files
