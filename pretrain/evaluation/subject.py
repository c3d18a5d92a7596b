"""What `pretrain eval` evaluates: a model rebuilt from a training run's checkpoint or from an export,
with the tokenizer and validation data it belongs to, every link between them checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import sentencepiece as spm
import torch

from pretrain.config import Config


@dataclass
class EvalSubject:
    model: torch.nn.Module  # PretrainModel, eval mode, fp32
    cfg: Config  # the config the model was trained with
    tokenizer: spm.SentencePieceProcessor
    data_dir: Path  # holds manifest.json and valid/ shards
    source: dict  # provenance for the report: run_dir/tag/step or export_dir


def _check_data_matches(data_dir: Path, tokenizer_sha256: str, what: str) -> dict:
    """The validation shards must be tokenised by the model's tokenizer."""
    from pretrain.data.manifest import load_manifest

    manifest = load_manifest(data_dir)
    if manifest.get("tokenizer_sha256") != tokenizer_sha256:
        raise ValueError(
            f"validation data {data_dir} was tokenised with tokenizer sha256 {str(manifest.get('tokenizer_sha256'))[:12]}..., "
            f"but {what} uses {tokenizer_sha256[:12]}...: pass --data-dir with data prepared by that tokenizer"
        )
    if not manifest.get("splits", {}).get("valid", {}).get("samples"):
        raise ValueError(f"{data_dir}/manifest.json lists no validation samples: re-run `pretrain prepare` with data.valid_fraction > 0")
    return manifest


def from_run(run_dir: str | Path, *, tag: Optional[str] = None, data_dir: Optional[str | Path] = None) -> EvalSubject:
    """A checkpoint of a training run (any ZeRO stage or pipeline layout), consolidated to fp32."""
    from pretrain.downstream.export import load_run_model

    run = load_run_model(run_dir, tag=tag)
    data_dir = Path(data_dir) if data_dir else run.cfg.data_dir
    _check_data_matches(data_dir, run.tokenizer_sha256, f"run {run_dir}")
    source = {"run_dir": str(run_dir), "tag": run.meta.get("tag", tag), "step": run.meta.get("step")}
    return EvalSubject(run.model, run.cfg, run.tokenizer, data_dir, source)


def from_export(export_dir: str | Path, *, data_dir: str | Path) -> EvalSubject:
    """An export directory (`pretrain export`): weights, config, tokenizer and table, hashes verified."""
    from pretrain.config import config_from_dict
    from pretrain.downstream.export import TOKENIZER_FILE, load_export

    model, tokenizer, manifest = load_export(export_dir)
    cfg = config_from_dict(manifest["config"], source=f"{export_dir}/config.json")
    _check_data_matches(Path(data_dir), manifest["files"][TOKENIZER_FILE]["sha256"], f"export {export_dir}")
    source = {"export_dir": str(export_dir), "step": (manifest.get("source") or {}).get("step")}
    return EvalSubject(model.float().eval(), cfg, tokenizer, Path(data_dir), source)
