"""An encoder pretrained with row-sparse tables (train.sparse_embedding, learned targets) loads with
dense gradients: fine-tuning clips and steps every parameter with torch's AdamW, as a user's loop would."""
import csv
import json

import torch

from pretrain.downstream import export as ex
from pretrain.downstream.classify import read_labelled
from pretrain.downstream.finetune import finetune


def _sparse_modules(model):
    return [name for name, m in model.named_modules() if getattr(m, "sparse", False) or getattr(m, "sparse_grad", False)]


def test_sparse_pretrained_export_loads_dense_and_fine_tunes(sparse_pretrained_export, tiny_targets, tmp_path, repo_root):
    export = sparse_pretrained_export
    assert json.loads((export / ex.CONFIG_FILE).read_text())["config"]["train"]["sparse_embedding"] is True  # what pretraining ran
    loaded = [ex.load_encoder(export)[0], *(ex.baseline_encoder(export, embeddings=e)[0] for e in ("random", "table"))]
    for model in loaded:
        assert _sparse_modules(model) == []
        model.train()
        ids = torch.randint(5, 50, (2, 8))
        model.encode(ids).float().pow(2).mean().backward()
        assert not any(p.grad.is_sparse for p in model.parameters() if p.grad is not None)

    rows = read_labelled(repo_root / "data/finetune/train.jsonl")
    train = tmp_path / "train.csv"
    with open(train, "w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], *list(zip(rows.texts, rows.labels))[:64]])
    cfg = tiny_targets.model_copy(deep=True)
    cfg.tracking.enabled = False
    ft = cfg.finetune
    ft.train_file, ft.valid_file, ft.valid_fraction, ft.epochs, ft.max_len = str(train), "", 0.25, 1, 32
    report = finetune(cfg, export, tmp_path / "finetuned")
    assert 0.0 <= report["accuracy"] <= 1.0 and report["train_rows"] + report["valid_rows"] == 64
