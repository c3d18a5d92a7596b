"""Fine-tune an exported encoder for sequence classification; report accuracy and macro-F1 per epoch.

The encoder comes from an export directory (`pretrain export`), or, with from_scratch, the same
architecture (its config.json) with random weights: the comparison that shows what pretraining buys.
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

from pretrain.config import Config, ConfigError, config_from_dict, resolve_shipped_path, save_resolved
from pretrain.downstream import export as export_mod
from pretrain.downstream.card import finetune_card
from pretrain.downstream.classify import (
    LabelledTexts, SequenceClassifier, balanced_head, encode_texts, label_vocabulary, pad_batch, read_labelled,
)

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.safetensors"
REPORT_FILE = "finetune_report.json"


# Metrics ---------------------------------------------------------------------------------------

def classification_metrics(pred: torch.Tensor, gold: torch.Tensor, num_labels: int) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class F1; a class never predicted nor present scores F1 = 0."""
    confusion = torch.bincount(gold * num_labels + pred, minlength=num_labels * num_labels).view(num_labels, num_labels).double()
    true_pos = confusion.diag()
    precision = true_pos / confusion.sum(0).clamp(min=1)
    recall = true_pos / confusion.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(precision))
    return {
        "accuracy": float(true_pos.sum() / confusion.sum().clamp(min=1)),
        "macro_f1": float(f1.mean()),
        "per_class_f1": [round(float(x), 4) for x in f1],
    }


def majority_baseline(train_labels: list[int], valid_labels: list[int], num_labels: int) -> dict[str, Any]:
    """Scores of always predicting the most frequent training label."""
    majority = Counter(train_labels).most_common(1)[0][0]
    gold = torch.tensor(valid_labels)
    scores = classification_metrics(torch.full_like(gold, majority), gold, num_labels)
    return {"label_index": majority, "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}


# Loop ------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: SequenceClassifier, sequences: list[list[int]], batch_size: int, pad_id: int) -> torch.Tensor:
    model.eval()
    preds = [model(pad_batch(sequences[i : i + batch_size], pad_id)).argmax(-1) for i in range(0, len(sequences), batch_size)]
    return torch.cat(preds)


def initial_encoder(init_dir: Path, from_scratch: bool, seed: int):
    """(encoder, tokenizer, export manifest): pretrained weights, or the same architecture at random."""
    encoder, sp, manifest = export_mod.load_export(init_dir)
    if from_scratch:
        from pretrain.model import build_model

        enc_cfg = config_from_dict(manifest["config"], source=str(init_dir / export_mod.CONFIG_FILE))
        # truly random: embeddings initialised from the pretrained target table would leak pretraining
        enc_cfg.model.init_embeddings_from_targets = False
        torch.manual_seed(seed)
        encoder = build_model(enc_cfg, manifest["vocab_size"], target_table=encoder.target_table, special_ids=manifest.get("special_ids"))
    return encoder, sp, manifest


@dataclass
class Task:
    """A labelled train/valid pair, tokenised."""

    train: LabelledTexts
    valid: LabelledTexts
    labels: list[str]
    train_ids: list[list[int]]
    valid_ids: list[list[int]]
    train_y: torch.Tensor
    valid_y: torch.Tensor


def load_task(ft, sp) -> Task:
    train_file, valid_file = resolve_shipped_path(ft.train_file), resolve_shipped_path(ft.valid_file)
    train = balanced_head(read_labelled(train_file, ft.text_field, ft.label_field, key="finetune.train_file"), ft.max_train_examples)
    valid = read_labelled(valid_file, ft.text_field, ft.label_field, key="finetune.valid_file")
    labels = label_vocabulary(train, valid)
    index = {name: i for i, name in enumerate(labels)}
    return Task(
        train, valid, labels,
        encode_texts(sp, train.texts, ft.max_len), encode_texts(sp, valid.texts, ft.max_len),
        torch.tensor([index[x] for x in train.labels]), torch.tensor([index[x] for x in valid.labels]),
    )


def _optimizer(model: nn.Module, ft, steps_per_epoch: int):
    total = steps_per_epoch * ft.epochs
    warmup = max(1, total // 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ft.lr, weight_decay=0.01)
    # linear warm-up then linear decay: the usual fine-tuning schedule
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
        logits = model(pad_batch([task.train_ids[i] for i in rows], model.pad_id))
        loss = nn.functional.cross_entropy(logits, task.train_y[rows])
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
    """Train a pooled classifier on cfg.finetune.train_file; evaluate on valid_file after every epoch."""
    cfg = cfg.model_copy(deep=True)
    if from_scratch is not None:
        cfg.finetune.from_scratch = from_scratch  # so the saved config and MLflow params say what ran
    with _torch_threads(cfg.finetune.num_threads):
        return _finetune(cfg, Path(init_dir), Path(out_dir))


def _finetune(cfg: Config, init_dir: Path, out_dir: Path) -> dict[str, Any]:
    from pretrain.tracking import start_tracking

    ft = cfg.finetune
    if out_dir.resolve() == init_dir.resolve():
        raise ConfigError(f"--out {out_dir} is the --init export itself; fine-tuning writes a new export, choose another directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory: choose another output directory")
    encoder, sp, manifest = initial_encoder(init_dir, ft.from_scratch, ft.seed)
    enc_model = manifest["config"]["model"]
    if ft.max_len > enc_model["max_seq_len"]:
        raise ConfigError(
            f"finetune.max_len={ft.max_len} exceeds the encoder's model.max_seq_len={enc_model['max_seq_len']} "
            f"({init_dir / export_mod.CONFIG_FILE}); set finetune.max_len={enc_model['max_seq_len']} or less"
        )
    task = load_task(ft, sp)
    torch.manual_seed(ft.seed)
    model = SequenceClassifier(encoder, enc_model["d_model"], len(task.labels), pooling=ft.pooling, pad_id=sp.pad_id())
    optimizer, schedule = _optimizer(model, ft, steps_per_epoch=-(-len(task.train_ids) // ft.batch_size))
    order = torch.Generator().manual_seed(ft.seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out_dir)
    history = []
    t0 = time.perf_counter()
    # The encoder's own files, not the pretraining data's: fine-tuning may run far from that.
    encoder_files = {"encoder": [init_dir / export_mod.CONFIG_FILE, init_dir / export_mod.TOKENIZER_FILE, init_dir / export_mod.CARD_FILE]}
    with start_tracking(cfg, out_dir, 0, inputs=encoder_files) as tracker:
        tracker.log_params({"finetune.init": str(init_dir)})
        for epoch in range(1, ft.epochs + 1):
            train_loss = train_epoch(model, task, optimizer, schedule, ft, order, desc=f"epoch {epoch}/{ft.epochs}")
            scores = classification_metrics(predict(model, task.valid_ids, ft.batch_size, model.pad_id), task.valid_y, len(task.labels))
            history.append({"epoch": epoch, "train_loss": train_loss, **scores})
            tracker.log_metrics({"train_loss": train_loss, "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}, step=epoch)
            log.info("epoch %d: train loss %.4f, valid accuracy %.4f, macro-F1 %.4f", epoch, train_loss, scores["accuracy"], scores["macro_f1"])
        baseline = majority_baseline(task.train_y.tolist(), task.valid_y.tolist(), len(task.labels))
        report = {
            "init": str(init_dir),
            "from_scratch": ft.from_scratch,
            "labels": task.labels,
            "train_file": str(task.train.path),
            "valid_file": str(task.valid.path),
            "train_rows": len(task.train),
            "valid_rows": len(task.valid),
            "accuracy": history[-1]["accuracy"],
            "macro_f1": history[-1]["macro_f1"],
            "majority_baseline": baseline | {"label": task.labels[baseline["label_index"]]},
            "history": history,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        save_finetuned(out_dir, model, init_dir, manifest, task.labels, ft, report)
        (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
        tracker.log_artifact(out_dir / REPORT_FILE)
    return report


# Saving / loading ------------------------------------------------------------------------------

def save_finetuned(out_dir: Path, model: SequenceClassifier, init_dir: Path, manifest: dict, labels: list[str], ft, report: dict) -> None:
    """The encoder as an export (loadable with load_encoder) plus the classifier head."""
    export_mod.save_weights(out_dir / CLASSIFIER_FILE, model.head.state_dict(), "fp32")
    classifier = {"labels": labels, "pooling": ft.pooling, "max_len": ft.max_len, "pad_id": model.pad_id, "file": CLASSIFIER_FILE}
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
        extra={"special_ids": manifest.get("special_ids"), "classifier": classifier, "finetuned_from": manifest.get("source", {}) | {"export": str(init_dir), "from_scratch": report["from_scratch"]}},
    )


def load_classifier(export_dir: str | Path) -> tuple[SequenceClassifier, Any, list[str]]:
    """(classifier in eval mode, SentencePieceProcessor, label names) from a `pretrain finetune` output."""
    export_dir = Path(export_dir)
    encoder, sp, manifest = export_mod.load_export(export_dir)
    if "classifier" not in manifest:
        raise export_mod.ExportError(f"{export_dir / export_mod.CONFIG_FILE} has no classifier: {export_dir} is a plain encoder export, not a `pretrain finetune` output")
    spec = manifest["classifier"]
    model = SequenceClassifier(encoder, manifest["config"]["model"]["d_model"], len(spec["labels"]), pooling=spec["pooling"], pad_id=spec["pad_id"])
    model.head.load_state_dict(export_mod.load_weights(export_dir / CLASSIFIER_FILE, model.head.state_dict()))
    return model.eval(), sp, spec["labels"]
