"""Fine-tune an exported encoder for sequence classification; report accuracy and macro-F1 per epoch.

The encoder comes from an export directory (`pretrain export`), or, with from_scratch, the same
architecture (its config.json) with random weights, optionally with only its input embeddings set
from the export's target table (table_init): the comparisons that show what pretraining buys. With
probe, the encoder stays frozen and only a linear head is fitted on its pooled vectors.
Texts longer than one window are read as sliding windows (classify.WindowPolicy), never cut.
Scores are reported beside two baselines on the same evaluation rows: the majority label of the
evaluation split, and TF-IDF + logistic regression (scikit-learn).
The fine-tuned model is saved as an export directory too (the encoder loads with load_encoder), plus
classifier.safetensors (the head) and finetune_report.json.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pretrain.config import Config, ConfigError, resolve_shipped_path, save_resolved
from pretrain.downstream import export as export_mod
from pretrain.downstream.card import finetune_card
from pretrain.downstream.classify import (
    LabelledTexts, SequenceClassifier, WindowPolicy, balanced_head, document_ids, holdout_split, label_vocabulary,
    read_labelled,
)

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.safetensors"
REPORT_FILE = "finetune_report.json"


# Metrics ---------------------------------------------------------------------------------------

def classification_metrics(pred: torch.Tensor, gold: torch.Tensor, num_labels: int) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision, recall, F1 and support; a class never predicted
    nor present scores F1 = 0."""
    pred, gold = pred.cpu(), gold.cpu()
    confusion = torch.bincount(gold * num_labels + pred, minlength=num_labels * num_labels).view(num_labels, num_labels).double()
    true_pos = confusion.diag()
    precision = true_pos / confusion.sum(0).clamp(min=1)
    recall = true_pos / confusion.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(precision))
    return {
        "accuracy": float(true_pos.sum() / confusion.sum().clamp(min=1)),
        "macro_f1": float(f1.mean()),
        "per_class_f1": [round(float(x), 4) for x in f1],
        "per_class_precision": [round(float(x), 4) for x in precision],
        "per_class_recall": [round(float(x), 4) for x in recall],
        "support": [int(x) for x in confusion.sum(1)],
    }


def majority_baseline(eval_labels: list[int], num_labels: int) -> dict[str, Any]:
    """Scores of always predicting the most frequent label of the evaluation split (the best constant
    predictor there; ties go to the lowest label index)."""
    counts = Counter(eval_labels)
    majority = min(counts, key=lambda label: (-counts[label], label))
    gold = torch.tensor(eval_labels)
    scores = classification_metrics(torch.full_like(gold, majority), gold, num_labels)
    return {"label_index": majority, "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}


def tfidf_baseline(train_texts: list[str], train_y: torch.Tensor, eval_texts: list[str], eval_y: torch.Tensor, num_labels: int, seed: int) -> dict[str, Any] | None:
    """TF-IDF (words and word pairs) + logistic regression, fitted on the training rows: the
    classic baseline an encoder has to beat. None (and a logged line) without scikit-learn."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
    except ImportError:
        log.warning("no TF-IDF baseline: scikit-learn is not installed (pip install -e '.[hf]')")
        return None
    pipeline = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(max_iter=2000, random_state=seed))
    pipeline.fit(train_texts, train_y.tolist())
    scores = classification_metrics(torch.as_tensor(pipeline.predict(eval_texts)), eval_y, num_labels)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}


# Data ------------------------------------------------------------------------------------------

@dataclass
class Task:
    """A labelled train/valid pair, tokenised (whole texts: windows are cut at batch time)."""

    train: LabelledTexts
    valid: LabelledTexts
    labels: list[str]
    train_ids: list[list[int]]
    valid_ids: list[list[int]]
    train_y: torch.Tensor
    valid_y: torch.Tensor
    train_rows_in_file: int


def load_task(ft, sp) -> Task:
    train_file = resolve_shipped_path(ft.train_file)
    everything = read_labelled(train_file, ft.text_field, ft.label_field, key="finetune.train_file")
    if ft.valid_fraction > 0:
        train, valid = holdout_split(everything, ft.valid_fraction, ft.seed)
    elif ft.valid_file:
        train = everything
        valid = read_labelled(resolve_shipped_path(ft.valid_file), ft.text_field, ft.label_field, key="finetune.valid_file")
    else:
        raise ConfigError("finetune.valid_file is empty and finetune.valid_fraction is 0: name an evaluation file "
                          "(finetune.valid_file=PATH, --valid PATH) or hold out a fraction (finetune.valid_fraction=0.2, --valid-fraction 0.2)")
    in_file = len(train)
    train = balanced_head(train, ft.max_train_examples)
    labels = label_vocabulary(train, valid)
    index = {name: i for i, name in enumerate(labels)}
    return Task(
        train, valid, labels, document_ids(sp, train.texts), document_ids(sp, valid.texts),
        torch.tensor([index[x] for x in train.labels]), torch.tensor([index[x] for x in valid.labels]), in_file,
    )


def row_counts(task: Task) -> dict[str, Any]:
    """Rows per split and per label, as the report and the console show them."""
    return {
        "train": {"rows": len(task.train), "rows_available": task.train_rows_in_file, "per_label": dict(sorted(Counter(task.train.labels).items()))},
        "valid": {"rows": len(task.valid), "per_label": dict(sorted(Counter(task.valid.labels).items()))},
    }


def _valid_source(task: Task, ft) -> str:
    """Where the evaluation rows come from: a held-out share of the training file, or their own file."""
    return f"{ft.valid_fraction:.0%} held out of {task.train.path}" if ft.valid_fraction > 0 else str(task.valid.path)


def _log_rows(task: Task, ft, counts: dict[str, Any]) -> None:
    train, valid = counts["train"], counts["valid"]
    capped = f" (first {train['rows']} of {train['rows_available']}: finetune.max_train_examples={ft.max_train_examples})" if train["rows"] < train["rows_available"] else ""
    source = _valid_source(task, ft)
    log.info("training rows: %d%s from %s; per label %s", train["rows"], capped, task.train.path, train["per_label"])
    log.info("evaluation rows: %d (%s); per label %s", valid["rows"], source, valid["per_label"])


# Models ----------------------------------------------------------------------------------------

def initial_encoder(init_dir: Path, from_scratch: bool, seed: int, *, table_init: bool = False):
    """(encoder, tokenizer, export manifest): pretrained weights, or the same architecture at random
    (table_init: its input embeddings from the export's target table)."""
    if table_init and not from_scratch:
        raise ConfigError("finetune.table_init=true builds a baseline from scratch: use it with --from-scratch (finetune.from_scratch=true)")
    if not from_scratch:
        return export_mod.load_export(init_dir)
    encoder, sp = export_mod.baseline_encoder(init_dir, embeddings="table" if table_init else "random", seed=seed)
    return encoder, sp, export_mod.read_manifest(init_dir)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("finetune.device=cuda but torch sees no CUDA device; use finetune.device=auto or cpu")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


# Loop ------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: SequenceClassifier, sequences: list[list[int]], batch_size: int) -> torch.Tensor:
    model.eval()
    preds = [model(model.batch(sequences[i : i + batch_size])).argmax(-1).cpu() for i in range(0, len(sequences), batch_size)]
    return torch.cat(preds)


@torch.no_grad()
def pooled_features(model: SequenceClassifier, sequences: list[list[int]], batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model.features(model.batch(sequences[i : i + batch_size])) for i in range(0, len(sequences), batch_size)])


def _optimizer(model: nn.Module, ft, steps_per_epoch: int):
    total = steps_per_epoch * ft.epochs
    warmup = max(1, total // 10)
    head = list(model.head.parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    optimizer = torch.optim.AdamW([{"params": body, "lr": ft.lr * ft.encoder_lr_scale}, {"params": head, "lr": ft.lr}], weight_decay=0.01)
    # linear warm-up then linear decay: the usual fine-tuning schedule (LambdaLR scales each group's own lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    return optimizer, schedule


def train_epoch(model: SequenceClassifier, task: Task, optimizer, schedule, ft, generator: torch.Generator, desc: str) -> float:
    """One pass over the training rows in a seeded random order; returns the mean loss."""
    model.train()
    order = torch.randperm(len(task.train_ids), generator=generator).tolist()
    losses = []
    bar = tqdm(range(0, len(order), ft.batch_size), desc=desc, leave=False, disable=None)  # None: no bar in logs
    for start in bar:
        rows = order[start : start + ft.batch_size]
        logits = model(model.batch([task.train_ids[i] for i in rows]))
        loss = nn.functional.cross_entropy(logits, task.train_y[rows].to(logits.device))
        if not torch.isfinite(loss):
            raise ValueError(f"fine-tuning loss became {loss.item()} ({desc}); lower finetune.lr (now {ft.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return sum(losses) / len(losses)


def fit_probe(model: SequenceClassifier, features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-4) -> float:
    """Linear probe: the head alone, fitted to convergence on frozen pooled vectors (full-batch
    L-BFGS on cross-entropy + l2·|W|²); returns the final training loss."""
    head, labels = model.head, labels.to(features.device)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(head(features), labels) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(nn.functional.cross_entropy(head(features), labels))


@contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def finetune(cfg: Config, init_dir: str | Path, out_dir: str | Path, *, from_scratch: bool | None = None) -> dict[str, Any]:
    """Train a pooled classifier on cfg.finetune.train_file; evaluate on the validation rows after every epoch."""
    cfg = cfg.model_copy(deep=True)
    if from_scratch is not None:
        cfg.finetune.from_scratch = from_scratch  # so the saved config and MLflow params say what ran
    with _torch_threads(cfg.finetune.num_threads):
        return _finetune(cfg, Path(init_dir), Path(out_dir))


def _init_kind(ft) -> str:
    return ("scratch+table" if ft.table_init else "scratch") if ft.from_scratch else "pretrained"


def _finetune(cfg: Config, init_dir: Path, out_dir: Path) -> dict[str, Any]:
    from pretrain.tracking import start_tracking

    ft = cfg.finetune
    if out_dir.resolve() == init_dir.resolve():
        raise ConfigError(f"--out {out_dir} is the --init export itself; fine-tuning writes a new export, choose another directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory: choose another output directory")
    if ft.probe and ft.probe_first:
        raise ConfigError("finetune.probe and finetune.probe_first are both set: --probe keeps the encoder frozen, "
                          "--probe-first fine-tunes it after fitting the head; choose one")
    device = pick_device(ft.device)
    encoder, sp, manifest = initial_encoder(init_dir, ft.from_scratch, ft.seed, table_init=ft.table_init)
    enc_model = manifest["config"]["model"]
    if ft.max_len > enc_model["max_seq_len"]:
        raise ConfigError(
            f"finetune.max_len={ft.max_len} exceeds the encoder's model.max_seq_len={enc_model['max_seq_len']} "
            f"({init_dir / export_mod.CONFIG_FILE}); set finetune.max_len={enc_model['max_seq_len']} or less"
        )
    task = load_task(ft, sp)
    counts = row_counts(task)
    _log_rows(task, ft, counts)
    policy = WindowPolicy.from_config(ft)
    torch.manual_seed(ft.seed)
    model = SequenceClassifier(encoder, enc_model["d_model"], len(task.labels), pooling=ft.pooling, pad_id=sp.pad_id(), windows=policy).to(device)
    longest = max(map(len, task.train_ids + task.valid_ids))
    log.info("%s on %s; %s (longest text: %d tokens)", "linear probe of the frozen encoder" if ft.probe else "fine-tuning", device,
             policy.describe(ft.pooling), longest)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out_dir)
    history = []
    t0 = time.perf_counter()
    # The encoder's own files, not the pretraining data's: fine-tuning may run far from that.
    encoder_files = {"encoder": [init_dir / export_mod.CONFIG_FILE, init_dir / export_mod.TOKENIZER_FILE, init_dir / export_mod.CARD_FILE]}
    with start_tracking(cfg, out_dir, 0, inputs=encoder_files) as tracker:
        tracker.log_params({"finetune.init": str(init_dir)})
        if ft.probe or ft.probe_first:  # the linear probe; probe_first (LP-FT) fine-tunes everything from its head
            probe_loss = fit_probe(model, pooled_features(model, task.train_ids, ft.batch_size), task.train_y)
        if ft.probe:
            model.encoder.requires_grad_(False)
            scores = classification_metrics(predict(model, task.valid_ids, ft.batch_size), task.valid_y, len(task.labels))
            history.append({"epoch": 1, "train_loss": probe_loss, **scores})
        else:
            if ft.probe_first:
                log.info("probe first (LP-FT): head fitted on the frozen encoder, train loss %.4f", probe_loss)
            optimizer, schedule = _optimizer(model, ft, steps_per_epoch=-(-len(task.train_ids) // ft.batch_size))
            order = torch.Generator().manual_seed(ft.seed)
            for epoch in range(1, ft.epochs + 1):
                train_loss = train_epoch(model, task, optimizer, schedule, ft, order, desc=f"epoch {epoch}/{ft.epochs}")
                scores = classification_metrics(predict(model, task.valid_ids, ft.batch_size), task.valid_y, len(task.labels))
                history.append({"epoch": epoch, "train_loss": train_loss, **scores})
                log.info("epoch %d: train loss %.4f, valid accuracy %.4f, macro-F1 %.4f", epoch, train_loss, scores["accuracy"], scores["macro_f1"])
        for step, h in enumerate(history, 1):
            tracker.log_metrics({"train_loss": h["train_loss"], "accuracy": h["accuracy"], "macro_f1": h["macro_f1"]}, step=step)
        baseline = majority_baseline(task.valid_y.tolist(), len(task.labels))
        tfidf = tfidf_baseline(task.train.texts, task.train_y, task.valid.texts, task.valid_y, len(task.labels), ft.seed) if ft.tfidf_baseline else None
        tracker.log_metrics({"majority_accuracy": baseline["accuracy"], **({"tfidf_accuracy": tfidf["accuracy"], "tfidf_macro_f1": tfidf["macro_f1"]} if tfidf else {})}, step=len(history))
        final = history[-1]
        report = {
            "init": str(init_dir),
            "from_scratch": ft.from_scratch,
            "init_kind": _init_kind(ft),
            "mode": "probe" if ft.probe else "finetune",
            "device": str(device),
            "labels": task.labels,
            "train_file": str(task.train.path),
            "valid_file": _valid_source(task, ft),
            "train_rows": len(task.train),
            "valid_rows": len(task.valid),
            "rows": counts,
            "windows": policy.as_dict() | {"policy": policy.describe(ft.pooling), "longest_text_tokens": longest},
            "accuracy": final["accuracy"],
            "macro_f1": final["macro_f1"],
            "per_class": {label: {"precision": final["per_class_precision"][i], "recall": final["per_class_recall"][i],
                                  "f1": final["per_class_f1"][i], "support": final["support"][i]} for i, label in enumerate(task.labels)},
            "majority_baseline": baseline | {"label": task.labels[baseline["label_index"]]},
            "tfidf_baseline": tfidf,
            "history": history,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        save_finetuned(out_dir, model.cpu(), init_dir, manifest, task.labels, ft, report)
        (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
        tracker.log_artifact(out_dir / REPORT_FILE)
    return report


# Saving / loading ------------------------------------------------------------------------------

def save_finetuned(out_dir: Path, model: SequenceClassifier, init_dir: Path, manifest: dict, labels: list[str], ft, report: dict) -> None:
    """The encoder as an export (loadable with load_encoder, and by Hugging Face tools) plus the classifier head."""
    export_mod.save_weights(out_dir / CLASSIFIER_FILE, model.head.state_dict(), "fp32")
    classifier = {"labels": labels, "pooling": ft.pooling, "max_len": ft.max_len, "windows": model.windows.as_dict(),
                  "pad_id": model.pad_id, "file": CLASSIFIER_FILE}
    card = finetune_card(manifest, report, classifier)
    export_mod.write_export(
        out_dir,
        state_dict=model.encoder.state_dict(),
        config=manifest["config"],
        vocab_size=manifest["vocab_size"],
        tokenizer_path=init_dir / export_mod.TOKENIZER_FILE,
        targets_path=init_dir / export_mod.TARGETS_FILE if export_mod.TARGETS_FILE in manifest["files"] else None,
        dtype="fp32",
        card=card,
        extra_files=[CLASSIFIER_FILE],
        hf_files=True,
        hf_tokenizer_from=init_dir,  # the same tokenizer.model: its tokenizer.json needs no second conversion
        extra={"special_ids": manifest.get("special_ids"), "classifier": classifier,
               "finetuned_from": manifest.get("source", {}) | {"export": str(init_dir), "from_scratch": report["from_scratch"], "init_kind": report["init_kind"]}},
    )


def load_classifier(export_dir: str | Path) -> tuple[SequenceClassifier, Any, list[str]]:
    """(classifier in eval mode, SentencePieceProcessor, label names) from a `pretrain finetune` output."""
    export_dir = Path(export_dir)
    encoder, sp, manifest = export_mod.load_export(export_dir)
    if "classifier" not in manifest:
        raise export_mod.ExportError(f"{export_dir / export_mod.CONFIG_FILE} has no classifier: {export_dir} is a plain encoder export, not a `pretrain finetune` output")
    spec = manifest["classifier"]
    model = SequenceClassifier(encoder, manifest["config"]["model"]["d_model"], len(spec["labels"]), pooling=spec["pooling"],
                               pad_id=spec["pad_id"], windows=WindowPolicy(**spec["windows"]))
    model.head.load_state_dict(export_mod.load_weights(export_dir / CLASSIFIER_FILE, model.head.state_dict()))
    return model.eval(), sp, spec["labels"]
