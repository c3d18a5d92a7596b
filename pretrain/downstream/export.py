"""Export a training run to a self-contained encoder directory, and load it back without DeepSpeed.

An export directory holds:
    model.safetensors    weights (tensor names = build_model's state_dict keys), fp32 or bf16
    config.json          resolved Config, vocab_size, dtype, sha256 + size of every other file, provenance
    tokenizer.model      the SentencePiece model
    targets.safetensors  the target table (decoding / continuous head; absent for a softmax run without one)
    README.md            model card
    modeling_softmaxfree.py, tokenizer.json, tokenizer_config.json, modules.json, sentence_bert_config.json,
    1_Pooling/config.json
                         what transformers (AutoModel/AutoTokenizer, trust_remote_code=True) and
                         sentence-transformers need (pretrain.downstream.hf_files); config.json carries
                         the transformers keys (model_type, auto_map, hidden_size, ...) beside the manifest

Loading verifies every hash and every tensor shape before building the model, and reads nothing but
JSON, safetensors and a SentencePiece protobuf: no pickle, no transformers. config.json is written
last, so an export interrupted half-way fails verification instead of loading stale files. The hashes
in config.json cover every other file; config.json itself is covered by the sha256 of its contents
(all but the file hashes) stored in model.safetensors' metadata, so an edited config (say the
objective, masked -> causal) is refused instead of building a different model around the weights.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from pretrain.data.tokenizer import file_sha256

if TYPE_CHECKING:
    from pretrain.config import Config

log = logging.getLogger(__name__)

FORMAT_NAME = "softmaxfree-encoder"
FORMAT_VERSION = 2  # 2: config signed in the weights' metadata, Hugging Face files
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
TARGETS_FILE = "targets.safetensors"
CARD_FILE = "README.md"
REQUIRED_FILES = (WEIGHTS_FILE, TOKENIZER_FILE)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# config.json's "dtype" is read by transformers too: it holds torch's name, "weights_dtype" ours.
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}
CONFIG_SIGNATURE_KEY = "config_sha256"  # in model.safetensors' metadata


class ExportError(ValueError):
    """An export directory that is incomplete, tampered with or inconsistent; the message names the file."""


# Writing ---------------------------------------------------------------------------------------

def save_weights(path: Path, state_dict: Mapping[str, torch.Tensor], dtype: str, metadata: Mapping[str, str] | None = None) -> None:
    """Floating tensors cast to `dtype`; tied tensors (one storage, two names) are stored twice."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    seen_storage: set[int] = set()
    tensors = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(DTYPES[dtype])
        ptr = tensor.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory; a copy per name keeps every key loadable.
        tensors[name] = tensor.contiguous().clone() if ptr in seen_storage else tensor.contiguous()
        seen_storage.add(ptr)
    save_file(tensors, str(path), metadata={"format": "pt", "dtype": dtype, **(metadata or {})})
    # safetensors creates the file owner-only (0600); an export is meant to be shared like any other file.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_export(
    out_dir: str | Path,
    *,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    vocab_size: int,
    tokenizer_path: str | Path,
    targets_path: str | Path | None,
    dtype: str = "fp32",
    card: str = "",
    extra_files: list[str] = (),
    extra: Mapping[str, Any] | None = None,
    hf_files: bool = False,
    hf_tokenizer_from: Path | None = None,
) -> Path:
    """Write the export files; config.json (with the hash of every other file) goes last.

    extra_files: names of files already written into out_dir that config.json should hash too.
    hf_files: also write what Hugging Face tools load (needs a real SentencePiece tokenizer and a
    full config: `model`, `tokenizer` sections, special_ids in extra); hf_tokenizer_from: an export of
    the same tokenizer whose converted tokenizer.json is reused.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file, not a directory: choose another output directory for the export")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).unlink(missing_ok=True)  # an interrupted re-export must not look complete
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "weights_dtype": dtype,
        "dtype": TORCH_DTYPE_NAMES.get(dtype, dtype),  # an unknown dtype is refused by save_weights below
        "vocab_size": int(vocab_size),
        "config": dict(config),
        **(extra or {}),
    }
    hf_names = []
    if hf_files:
        from pretrain.data.tokenizer import load_tokenizer
        from pretrain.downstream.hf_files import hf_config, write_hf_files

        manifest |= hf_config(config["model"], vocab_size, manifest["special_ids"])
        hf_names = write_hf_files(out_dir, load_tokenizer(tokenizer_path), config["tokenizer"]["model_type"], config["model"],
                                   converted_in=hf_tokenizer_from)
    save_weights(out_dir / WEIGHTS_FILE, state_dict, dtype, metadata={CONFIG_SIGNATURE_KEY: config_signature(manifest)})
    copies = {TOKENIZER_FILE: tokenizer_path}
    if targets_path is not None:
        copies[TARGETS_FILE] = targets_path
    else:
        (out_dir / TARGETS_FILE).unlink(missing_ok=True)  # no stale table from an earlier export
    for name, src in copies.items():
        if Path(src).resolve() != (out_dir / name).resolve():
            shutil.copyfile(src, out_dir / name)
    if card:
        (out_dir / CARD_FILE).write_text(card)
    names = (WEIGHTS_FILE, *copies, *hf_names, *extra_files)
    manifest["files"] = {name: {"sha256": file_sha256(out_dir / name), "bytes": (out_dir / name).stat().st_size} for name in names}
    tmp = out_dir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out_dir / CONFIG_FILE)
    return out_dir


def config_signature(manifest: Mapping[str, Any]) -> str:
    """sha256 of config.json's contents but the file hashes (which cover the weights that carry it)."""
    import hashlib

    signed = {k: v for k, v in manifest.items() if k != "files"}
    return hashlib.sha256(json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# Verifying and reading -------------------------------------------------------------------------

def _check_signature(export_dir: Path, manifest: dict) -> None:
    from safetensors import SafetensorError, safe_open

    weights = export_dir / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as f:
            signed = (f.metadata() or {}).get(CONFIG_SIGNATURE_KEY)
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"{weights}: not a readable safetensors file ({exc})") from None
    if signed != config_signature(manifest):
        raise ExportError(
            f"{export_dir / CONFIG_FILE} was edited after the export (its sha256 does not match the one signed in "
            f"{WEIGHTS_FILE}): the weights belong to the config they were exported with; re-run `pretrain export` "
            "(or `pretrain finetune`) instead of editing config.json"
        )


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """config.json of an export, checked for format; every hashed file present with its recorded sha256."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise FileNotFoundError(f"export directory {export_dir} not found (create one with `pretrain export RUN_DIR OUT_DIR`)")
    cfg_path = export_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise ExportError(f"{cfg_path} missing: {export_dir} is not a complete export (re-run `pretrain export RUN_DIR {export_dir}`)")
    try:
        manifest = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{cfg_path} is not valid JSON ({exc}); re-run `pretrain export`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ExportError(f"{cfg_path} is not a {FORMAT_NAME} export config (no \"format\": \"{FORMAT_NAME}\")")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{cfg_path}: format_version {manifest.get('format_version')!r} is not supported (this code reads {FORMAT_VERSION}); re-run `pretrain export` with this version")
    for key in ("config", "vocab_size", "files", "weights_dtype"):
        if key not in manifest:
            raise ExportError(f"{cfg_path}: missing key {key!r}; re-run `pretrain export`")
    missing_records = [name for name in REQUIRED_FILES if name not in manifest["files"]]
    if missing_records:
        raise ExportError(f"{cfg_path}: no sha256 recorded for {missing_records}; re-run `pretrain export`")
    for name, record in manifest["files"].items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or len(parts) > 2:
            raise ExportError(f"{cfg_path}: file entry {name!r} is not a plain file name inside the export")
        path = export_dir / name
        expected = record.get("sha256") if isinstance(record, dict) else None
        if not expected:
            raise ExportError(f"{cfg_path}: no sha256 recorded for {name}; re-run `pretrain export`")
        if not path.is_file():
            raise ExportError(f"{path} missing from the export; re-run `pretrain export`")
        actual = file_sha256(path)
        if actual != expected:
            raise ExportError(
                f"{path}: sha256 {actual[:12]}… does not match {expected[:12]}… recorded in {CONFIG_FILE} "
                "(the file was modified or replaced); re-export instead of editing files in place"
            )
    _check_signature(export_dir, manifest)
    return manifest


def match_state(loaded: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """`loaded` checked name by name and shape by shape against `expected`, cast to its dtypes."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    wrong_shape = [f"{k}: {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}" for k in expected if k in loaded and loaded[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        if wrong_shape:
            parts.append("shape mismatches " + "; ".join(wrong_shape[:5]))
        raise ExportError(f"{source} does not fit the model its config describes: " + ", ".join(parts))
    return {k: (v.to(expected[k].dtype) if v.is_floating_point() else v) for k, v in loaded.items()}


def load_weights(path: Path, expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read safetensors weights (no pickle), checked against the state_dict of a freshly built model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        loaded = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"{path}: not a readable safetensors file ({exc})") from None
    return match_state(loaded, expected, str(path))


def _verified_parts(export_dir: Path):
    """(Config, SentencePieceProcessor, config.json contents, target table or None), every file verified."""
    from pretrain.config import ConfigError, config_from_dict
    from pretrain.data.tokenizer import load_tokenizer
    from pretrain.targets.table import load_target_table

    manifest = read_manifest(export_dir)
    try:
        cfg = config_from_dict(manifest["config"], source=str(export_dir / CONFIG_FILE))
    except ConfigError as exc:
        raise ExportError(f"{export_dir / CONFIG_FILE}: the stored config does not validate with this version of the code: {exc}") from None
    # The row-sparse table gradients (train.sparse_embedding) belong to the pretraining step's lazy row
    # AdamW: a loaded encoder gets ordinary dense gradients, which fine-tuning's AdamW and gradient
    # clipping, and any user's own loop, expect. config.json keeps what the pretraining ran.
    cfg.train.sparse_embedding = False
    vocab_size = manifest["vocab_size"]
    sp = load_tokenizer(export_dir / TOKENIZER_FILE)
    if sp.get_piece_size() != vocab_size:
        raise ExportError(f"{export_dir / TOKENIZER_FILE} has {sp.get_piece_size()} pieces but {CONFIG_FILE} says vocab_size={vocab_size}; re-export")
    table = None
    if TARGETS_FILE in manifest["files"]:
        try:
            table, _ = load_target_table(export_dir / TARGETS_FILE, tokenizer_sha256=manifest["files"][TOKENIZER_FILE]["sha256"], vocab_size=vocab_size)
        except ValueError as exc:
            raise ExportError(f"{export_dir}: the target table does not belong with this export: {exc}") from None
    elif cfg.model.head == "continuous":
        raise ExportError(f"{export_dir / CONFIG_FILE} lists no {TARGETS_FILE}, which a continuous-head model needs; re-run `pretrain export`")
    return cfg, sp, manifest, table


def load_export(export_dir: str | Path, *, dtype: str = "fp32"):
    """(model in eval mode, SentencePieceProcessor, config.json contents), every file verified first."""
    from pretrain.model import build_model

    export_dir = Path(export_dir)
    cfg, sp, manifest, table = _verified_parts(export_dir)
    # The saved weights replace every initial value: skip the embedding init from the table (a
    # softmax export may even ship without one).
    cfg.model.init_embeddings_from_targets = False
    model = build_model(cfg, manifest["vocab_size"], target_table=table, special_ids=manifest.get("special_ids"))
    model.load_state_dict(load_weights(export_dir / WEIGHTS_FILE, model.state_dict()), strict=True)
    model.tokenizer = sp  # for model.embed(texts)
    return model.to(DTYPES[dtype]).eval(), sp, manifest


def load_encoder(export_dir: str | Path, *, dtype: str = "fp32"):
    """(torch.nn.Module in eval mode, SentencePieceProcessor) from a `pretrain export` directory.

    Needs neither DeepSpeed nor the training run: hashes and tensor shapes are checked against
    config.json, weights are read with safetensors (no pickle). `dtype` is the compute dtype.
    """
    model, sp, _ = load_export(export_dir, dtype=dtype)
    return model, sp


def baseline_encoder(export_dir: str | Path, *, embeddings: str = "random", seed: int = 0, dtype: str = "fp32"):
    """(model, SentencePieceProcessor): the export's architecture and tokenizer with fresh weights, the
    baselines a pretrained encoder is measured against.

    embeddings="random": every weight random (what pretraining starts from).
    embeddings="table":  random, but the input embeddings set from the export's target table (the
                         fastText initialisation, no pretraining): separates the table's share of a gain.
    """
    from pretrain.model import build_model

    if embeddings not in ("random", "table"):
        raise ValueError(f"embeddings must be 'random' or 'table', got {embeddings!r}")
    export_dir = Path(export_dir)
    cfg, sp, manifest, table = _verified_parts(export_dir)  # every file checked, as for the pretrained encoder
    if table is None and embeddings == "table":
        raise ExportError(f"{export_dir} has no {TARGETS_FILE} to initialise the embeddings from (a softmax run exported without a table)")
    cfg.model.init_embeddings_from_targets = embeddings == "table"
    cfg.train.seed = seed  # the projection to d_model, when the table is narrower or wider
    torch.manual_seed(seed)
    model = build_model(cfg, manifest["vocab_size"], target_table=table, special_ids=manifest.get("special_ids"))
    model.tokenizer = sp
    return model.to(DTYPES[dtype]).eval(), sp


# From a training run ---------------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is not valid JSON; left out of the model card", path)
        return None


def _data_summary(manifest: dict) -> dict[str, Any]:
    splits = manifest.get("splits") or {}
    return {f"{split} sequences / tokens": f"{info['samples']:,} / {info['tokens']:,}" for split, info in splits.items()
            if isinstance(info, dict) and isinstance(info.get("samples"), int) and isinstance(info.get("tokens"), int)}


def _run_table(cfg, meta: dict, run_dir: Path, tokenizer_sha: str, vocab_size: int) -> tuple[Path, torch.Tensor] | None:
    """(path, rows) of the target table the run trained with (the learned one for learned targets), hash-checked."""
    from pretrain.targets.table import load_target_table

    path = Path(meta.get("targets_path") or cfg.targets_path)
    if not meta.get("targets_sha256"):  # softmax run that never read a table: ship one only if it fits
        if path.is_file():
            try:
                return path, load_target_table(path, tokenizer_sha256=tokenizer_sha, vocab_size=vocab_size)[0]
            except ValueError as exc:
                log.warning("not exporting %s with this softmax run: %s", path, exc)
        return None
    return path, _checked_table(path, meta["targets_sha256"], run_dir, tokenizer_sha, vocab_size)


def _checked_table(path: Path, sha256: str, run_dir: Path, tokenizer_sha: str, vocab_size: int) -> torch.Tensor:
    from pretrain.targets.table import load_target_table

    if not path.is_file():
        raise FileNotFoundError(f"target table {path} of run {run_dir} not found; run the export from the directory the run was trained in")
    if file_sha256(path) != sha256:
        raise ValueError(f"{path} changed since run {run_dir} was trained (sha256 differs from the checkpoint's meta.json); "
                         "export needs the table the run used (rebuild it with the run's config, or retrain)")
    return load_target_table(path, tokenizer_sha256=tokenizer_sha, vocab_size=vocab_size)[0]


@dataclass
class RunModel:
    """A run's checkpoint as a plain fp32 model, with the tokenizer and table it trained with (hash-checked)."""

    model: torch.nn.Module
    cfg: Config
    meta: dict
    tokenizer: Any  # sentencepiece.SentencePieceProcessor
    tokenizer_path: Path
    tokenizer_sha256: str
    targets_path: Path | None
    data_manifest: dict


def load_run_model(run_dir: str | Path, *, tag: str | None = None) -> RunModel:
    """Checkpoint of a run (any ZeRO stage or pipeline layout) -> the model of build_model, weights loaded.

    Shared by export and eval: the tokenizer and target table must be the files the run trained with.
    """
    from pretrain.data.manifest import load_manifest
    from pretrain.data.tokenizer import load_tokenizer
    from pretrain.engine.checkpoint import load_model_state
    from pretrain.model import build_model

    run_dir = Path(run_dir)
    state_dict, cfg, meta = load_model_state(run_dir, tag=tag)
    data_manifest = load_manifest(cfg.data_dir)
    tokenizer_path = cfg.data_dir / data_manifest.get("tokenizer_file", "tokenizer.model")
    tokenizer_sha = file_sha256(tokenizer_path)
    if meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != tokenizer_sha:
        raise ValueError(f"{tokenizer_path} changed since run {run_dir} was trained (sha256 differs from the checkpoint's meta.json); "
                         "use the tokenizer the run was trained with")
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = tokenizer.get_piece_size()
    targets_path, table = _run_table(cfg, meta, run_dir, tokenizer_sha, vocab_size) or (None, None)
    if cfg.targets.learned and cfg.model.input_embedding == "targets":
        # The encoder's input read the source table all along (the learned one is in the weights).
        table = _checked_table(cfg.targets_path, meta["source_targets_sha256"], run_dir, tokenizer_sha, vocab_size)
    # Fails before anything is written if the consolidated weights do not fit the architecture.
    model = build_model(cfg, vocab_size, target_table=table, special_ids=data_manifest.get("special_ids"))
    model.load_state_dict(match_state(state_dict, model.state_dict(), f"checkpoint of {run_dir}"), strict=True)
    return RunModel(model.float().eval(), cfg, meta, tokenizer, tokenizer_path, tokenizer_sha, targets_path, data_manifest)


def with_learned_input_embedding(model, cfg) -> tuple[torch.nn.Module, Config]:
    """(model, cfg) computing the same function with an ordinary V x d_model input embedding.

    A model.input_embedding=targets model's adapter over the frozen table is folded into
    encoder.embed.tok_emb (adapter(table), every row): the export then loads, fine-tunes and runs in
    Hugging Face tools like any other, and does not depend on the source table.
    """
    from pretrain.model import build_model

    if cfg.model.input_embedding == "learned":
        return model, cfg
    out_cfg = cfg.model_copy(deep=True)
    out_cfg.model.input_embedding = "learned"
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.embed.adapter.")}
    state["encoder.embed.tok_emb.weight"] = model.encoder.embed.token_table()
    # The table argument serves the loss and the (overwritten) learned targets, not the input any more;
    # every initial value is overwritten, so no embedding init from the table (a softmax model has none).
    build_cfg = out_cfg.model_copy(deep=True)
    build_cfg.model.init_embeddings_from_targets = False
    out = build_model(build_cfg, state["encoder.embed.tok_emb.weight"].shape[0], target_table=model.target_table,
                      special_ids=model.objective.special_ids)
    out.load_state_dict(state, strict=True)
    return out.to(model.encoder.embed.pos_emb.weight.dtype).eval(), out_cfg


def export_run(run_dir: str | Path, out_dir: str | Path, *, dtype: str = "fp32", tag: str | None = None) -> Path:
    """Checkpoint of a run (any ZeRO stage or pipeline layout) -> self-contained export directory."""
    from pretrain.downstream.card import export_card

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = load_run_model(run_dir, tag=tag)
    model, cfg = with_learned_input_embedding(run.model, run.cfg)
    meta, targets_path, data_manifest = run.meta, run.targets_path, run.data_manifest
    vocab_size = run.tokenizer.get_piece_size()
    source = {
        "input_embedding": run.cfg.model.input_embedding,
        "run_dir": str(run_dir),
        "tag": meta.get("tag", tag),
        "step": meta.get("step"),
        "world_size": meta.get("world_size"),
        "tokens_seen": meta.get("tokens_seen"),
        "zero_stage": cfg.train.zero_stage,
        "pipeline_stages": cfg.train.pipeline_stages,
    }
    eval_report = _read_json(run_dir / "eval" / "report.json")
    card = export_card(
        name=cfg.train.run_name, config=cfg.to_dict(), vocab_size=vocab_size,
        num_parameters=sum(p.numel() for p in model.parameters()), dtype=dtype, source=source,
        data=_data_summary(data_manifest), eval_report=eval_report,
    )
    write_export(out_dir, state_dict=model.state_dict(), config=cfg.to_dict(), vocab_size=vocab_size,
                 tokenizer_path=run.tokenizer_path, targets_path=targets_path, dtype=dtype, card=card, hf_files=True,
                 extra={"special_ids": model.objective.special_ids, "source": source, "eval": eval_report or {}})
    log.info("exported %s (step %s) to %s", run_dir, source["step"], out_dir)
    return out_dir
