"""Exports of untrained tiny models (seconds, no training run): for the loading paths (Hugging Face,
long inputs, embed) where what matters is that every loader computes the same function."""
import pytest
import torch

from pretrain.config import config_from_dict
from pretrain.data.manifest import load_manifest
from pretrain.downstream import export as ex
from pretrain.model import build_model
from pretrain.targets.table import load_target_table


def export_untrained(tiny_data, out_dir, overrides=None, seed=0, targets=False, sections=None):
    """build_model on tiny_data's tokenizer (random weights), exported: softmax head without a
    target table, or (targets=True, tiny_data built by tiny_targets) continuous head with its table.
    overrides: model settings; sections: other config sections' settings, e.g. {"train": {...}}."""
    base = tiny_data.to_dict()
    cfg = config_from_dict(base | {"model": base["model"] | {
        "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "max_seq_len": 32, "head": "continuous" if targets else "softmax",
        "init_embeddings_from_targets": False, **(overrides or {})}} | {k: base[k] | v for k, v in (sections or {}).items()})
    manifest = load_manifest(tiny_data.data_dir)
    tokenizer_path = tiny_data.data_dir / manifest.get("tokenizer_file", "tokenizer.model")
    from pretrain.data.tokenizer import load_tokenizer

    vocab_size = load_tokenizer(tokenizer_path).get_piece_size()
    table = load_target_table(cfg.targets_path)[0] if targets else None
    torch.manual_seed(seed)
    model = build_model(cfg, vocab_size, target_table=table, special_ids=manifest.get("special_ids"))
    return ex.write_export(out_dir, state_dict=model.state_dict(), config=cfg.to_dict(), vocab_size=vocab_size,
                           tokenizer_path=tokenizer_path, targets_path=cfg.targets_path if targets else None, card="# untrained tiny encoder\n", hf_files=True,
                           extra={"special_ids": model.objective.special_ids, "source": {"step": 0}})


@pytest.fixture(scope="session")
def untrained_export(tiny_data, tmp_path_factory):
    """Masked-objective tiny encoder (d_model 32, 2 layers, 32 positions) exported with its Hugging Face files."""
    return export_untrained(tiny_data, tmp_path_factory.mktemp("untrained") / "export")


@pytest.fixture(scope="session")
def untrained_continuous_export(tiny_targets, tmp_path_factory):
    """As untrained_export, with a continuous head and the tiny fastText target table (dim 64)."""
    return export_untrained(tiny_targets, tmp_path_factory.mktemp("untrained") / "continuous", targets=True)


@pytest.fixture
def make_untrained_export(tiny_data, tmp_path):
    """export_untrained with other model settings: make_untrained_export(name, overrides={...}, seed=...)."""
    return lambda name, **kwargs: export_untrained(tiny_data, tmp_path / name, **kwargs)


@pytest.fixture
def sparse_pretrained_export(tiny_targets, tmp_path):
    """As untrained_continuous_export, from a config that pretrained with row-sparse tables
    (train.sparse_embedding) and learned targets."""
    sections = {"train": {"sparse_embedding": True, "zero_stage": 0, "precision": "fp32"}, "targets": {"learned": True}}
    return export_untrained(tiny_targets, tmp_path / "sparse", targets=True, sections=sections)
