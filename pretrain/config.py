"""Typed, validated run configuration.

A run is described by one YAML file (see configs/) plus dotted overrides on the command line,
e.g. ``pretrain train configs/tiny.yaml train.lr=3e-4``. Unknown keys and wrong types are errors
that name the key. Every stage writes the resolved config next to its outputs.

Paths left empty are derived from ``workdir`` (see the ``*_dir`` properties of ``Config``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"


class ConfigError(ValueError):
    """A configuration problem; the message names the key or file and the fix."""


class Section(BaseModel):
    # strict: no silent str->int coercion; extra=forbid: a typo in a key is an error, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class TokenizerConfig(Section):
    model_type: Literal["unigram", "bpe"] = "unigram"
    vocab_size: int = Field(4000, gt=8)
    # Sample of the corpus the tokenizer is trained on (bytes of text).
    sample_bytes: int = Field(20_000_000, gt=0)
    # At most this many bytes of any one document go into that sample; empty -> 1% of sample_bytes.
    sample_doc_bytes: Optional[int] = Field(None, gt=0)
    # Reuse an existing SentencePiece model instead of training one.
    model_path: Optional[str] = None
    character_coverage: float = Field(0.9995, gt=0, le=1)


class DataConfig(Section):
    # Plain text, JSONL (text_field), Parquet (column text_field), gzip/zstd; files, directories or globs.
    corpus: list[str] = Field(default_factory=lambda: ["data/corpus"])
    text_field: str = "text"
    # What one document is in a plain-text file: each non-empty "line", or a "blank_line"-separated
    # paragraph (lines joined with "\n"); "auto" chooses per file (blank_line for markdown/rst/tex and
    # hard-wrapped prose, else line). In JSONL/Parquet, a document is always one record's text_field.
    doc_separator: Literal["auto", "line", "blank_line"] = "auto"
    # A line/record/document longer than this (bytes) is split into pieces or skipped (oversize).
    max_record_bytes: int = Field(16_000_000, ge=4)
    oversize: Literal["split", "skip"] = "split"
    # Invalid UTF-8: "replace" with U+FFFD, or "skip" the line and count it.
    utf8_errors: Literal["replace", "skip"] = "replace"
    # Output directory of `pretrain prepare`; empty -> <workdir>/data.
    dir: Optional[str] = None
    # Read the shards from this URL prefix (s3://, gs://, https://, or pipe:CMD with {name}) where a
    # copy of the data dir lives; the data dir keeps manifest.json and the tokenizer (pretrain.data.remote).
    shards_url: Optional[str] = None
    seq_len: int = Field(128, gt=1)
    samples_per_shard: int = Field(1024, gt=0)
    valid_fraction: float = Field(0.02, ge=0, lt=1)
    seed: int = 0
    # Processes that tokenise the corpus's parts in parallel; 0 -> all CPU cores. The output does
    # not depend on it.
    num_proc: int = Field(0, ge=0)
    # An uncompressed text or JSONL file over this size is tokenised as several parts, one per
    # byte range (part of the output layout: the shards change with it).
    part_bytes: int = Field(64_000_000, gt=0)
    # Only a valid split, of the whole corpus, with tokenizer.model_path: a held-out set to score a
    # model on (`pretrain prepare --eval-only`).
    eval_only: bool = False
    # A corrupt shard while streaming: stop with an error, or log, count and skip it.
    on_corrupt_shard: Literal["error", "skip"] = "error"
    # Shuffle buffer (samples) inside each loader worker; 0 disables the sample-level shuffle.
    shuffle_buffer: int = Field(256, ge=0)
    # DataLoader worker processes per rank.
    loader_workers: int = Field(1, ge=0)


class TargetsConfig(Section):
    method: Literal["trained", "imported", "random"] = "trained"
    dim: int = Field(64, gt=1)
    # Output table; empty -> <workdir>/targets/targets.safetensors.
    path: Optional[str] = None
    # For method=imported: a word2vec/fastText .vec/.txt or binary file.
    import_path: Optional[str] = None
    import_binary: bool = False
    # gensim trainer settings.
    algorithm: Literal["skipgram", "fasttext"] = "fasttext"
    window: int = Field(5, gt=0)
    negative: int = Field(5, ge=0)
    epochs: int = Field(3, gt=0)
    min_count: int = Field(1, gt=0)
    # fastText hash buckets for character n-grams (gensim's default 2M x dim floats is too big here).
    ngram_buckets: int = Field(100_000, gt=0)
    # Trainer threads; 0 -> all CPU cores. Only workers=1 gives a bit-identical table run to run
    # (gensim threads race on the shared weights; its docs also ask for a fixed PYTHONHASHSEED),
    # at a multiple of the time.
    workers: int = Field(0, ge=0)
    seed: int = 0
    # Isotropy post-processing of trained/imported rows ("all-but-the-top", pretrain/targets/isotropy.py):
    # subtract the mean row and project out this many top principal directions; -1 turns it off.
    # Without it a few hub rows are the nearest neighbour of almost every prediction.
    remove_top_components: int = Field(2, ge=-1)
    # Learned targets: the table becomes a trainable parameter with an anti-collapse remedy.
    learned: bool = False
    learned_remedy: Literal["none", "contrastive", "ema", "vicreg"] = "contrastive"
    learned_lr_scale: float = Field(1.0, gt=0)
    contrastive_weight: float = Field(1.0, ge=0)
    contrastive_temperature: float = Field(0.1, gt=0)
    # Uniformly sampled negative ids per step, on top of the batch's own targets (contrastive, vicreg).
    contrastive_negatives: int = Field(1024, ge=0)
    vicreg_weight: float = Field(1.0, ge=0)
    ema_decay: float = Field(0.99, ge=0, lt=1)


class ModelConfig(Section):
    objective: Literal["masked", "causal"] = "masked"
    head: Literal["continuous", "softmax"] = "continuous"
    d_model: int = Field(128, gt=0)
    n_layers: int = Field(2, gt=0)
    n_heads: int = Field(4, gt=0)
    d_ff: int = Field(512, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    max_seq_len: int = Field(128, gt=1)
    # Softmax head: tie the output projection to the input embeddings.
    tie_softmax: bool = False
    # Initialise input embeddings from the target table (needs d_model == targets.dim, else projected).
    init_embeddings_from_targets: bool = False
    # The encoder's token embedding: "learned" (a V x d_model table) or "targets" (the frozen target
    # table, V x targets.dim unit rows, through a learned targets.dim -> d_model linear adapter): then
    # nothing V-sized has a gradient or optimizer state, under any ZeRO stage, precision or pipeline.
    # With learned targets the encoder reads the initial (source) table. Export materialises it into
    # an ordinary V x d_model embedding. init_embeddings_from_targets has nothing to do then.
    input_embedding: Literal["learned", "targets"] = "learned"
    mask_prob: float = Field(0.15, gt=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        return self


class LossConfig(Section):
    name: Literal[
        "cosine", "l2", "l2_raw", "vmf", "vmf_reg1", "vmf_reg2", "vmf_practice", "margin", "syn_margin_orth", "syn_margin_diff"
    ] = "cosine"
    # auto: Triton on CUDA, PyTorch reference elsewhere.
    impl: Literal["auto", "triton", "reference"] = "auto"
    # Fuse the hidden -> D projection with the loss, processed in token chunks.
    fused_head: bool = False
    chunk_size: int = Field(1024, gt=0)
    # vMF: closed-form approximation of log C_m (default) or the exact Bessel form.
    vmf_exact: bool = False
    # Closed form of log C_m: debye (accurate NLL, default) or the two circulating forms of Kumar &
    # Tsvetkov's code, paper ((v+1)²) / paper_fixed ((v-1)²), which are up to a constant (docs/kernels.md).
    vmf_approx: Literal["debye", "paper", "paper_fixed"] = "debye"
    vmf_lambda1: float = 0.02
    vmf_lambda2: float = 0.1
    vmf_lambda: float = 0.2
    margin: float = 0.5
    # κ schedule of the vMF losses (κ is the prediction's norm): for the first kappa_warmup_steps optimizer
    # steps the loss sees the prediction scaled by s, rising linearly from kappa_scale_start to 1 (a low
    # κ, i.e. a high temperature, early on); 0 = off. A resumed run continues the ramp from its step.
    # Not with loss.fused_head. Measured (README, quality study): no gain with learned targets, −3.9
    # top-1 points with the fixed table on the WordNet glosses.
    kappa_warmup_steps: int = Field(0, ge=0)
    kappa_scale_start: float = Field(0.1, gt=0, le=1)


class TrainConfig(Section):
    # Run directory; empty -> <workdir>/runs/<run_name>.
    run_dir: Optional[str] = None
    run_name: str = "run"
    steps: int = Field(200, gt=0)
    micro_batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    zero_stage: Literal[0, 1, 2, 3] = 1
    # Input embedding and learned target table (targets.learned) with row-sparse gradients and a lazy
    # AdamW step on the batch's rows only (pretrain/engine/optim.py): the step no longer costs O(V).
    # ZeRO-0, fp32, no pipeline.
    sparse_embedding: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    pipeline_stages: int = Field(1, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    keep_last: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    seed: int = 1234
    # NaN/inf guard: skip such steps; stop (with a checkpoint) after this many in a row.
    max_bad_steps_in_row: int = Field(5, gt=0)
    progress: bool = True

    @field_validator("run_name")
    @classmethod
    def _one_path_component(cls, name: str) -> str:
        # The run directory is <workdir>/runs/<run_name>: "" or "../.." would put it (and its checkpoints) elsewhere.
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError("must be one directory name (not empty, '.', '..', no '/' or '\\'); "
                             "to train elsewhere set train.run_dir")
        return name


class EvalConfig(Section):
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    # auto: sharded over all GPUs when there are several, one GPU, else CPU.
    device: Literal["auto", "cpu", "gpu", "sharded"] = "auto"
    topk: int = Field(5, gt=0)
    batch_size: int = Field(32, gt=0)
    max_batches: int = Field(0, ge=0)  # per rank; 0 = the rank's whole share of the validation split
    ivf_nlist: int = Field(256, gt=0)
    ivf_nprobe: int = Field(16, gt=0)
    hnsw_m: int = Field(32, gt=0)
    hnsw_ef_search: int = Field(128, gt=0)
    samples_to_show: int = Field(3, ge=0)
    # Seeds the masked objective's corruption in eval, so every checkpoint (continuous or softmax)
    # is scored on the identical masked positions.
    seed: int = 0


class TrackingConfig(Section):
    enabled: bool = True
    # Empty -> a local SQLite store inside the run directory (no server needed).
    tracking_uri: Optional[str] = None
    experiment: str = "softmax-free-pretraining"
    # MLflow run name; empty -> the run directory's name.
    run_name: Optional[str] = None
    # Tracking server unreachable: keep records in <run_dir>/mlflow_pending.jsonl and retry this often.
    retry_seconds: float = Field(60.0, gt=0)
    # Per-request HTTP timeout towards the server, so a hung server never stalls training for long.
    http_timeout_s: int = Field(5, gt=0)


class FinetuneConfig(Section):
    # Labelled CSV/TSV (header row) or JSONL files; a relative path not found from the current
    # directory is read from the repository (the shipped data/finetune files work from anywhere).
    train_file: str = "data/finetune/train.jsonl"
    # Empty: hold out valid_fraction of the training rows instead (stratified by label, seeded).
    valid_file: str = "data/finetune/valid.jsonl"
    valid_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    text_field: str = "text"
    label_field: str = "label"
    # Use only this many training rows (0 = all, the default): the first ones of each label in file
    # order, the same number per label. Pretraining pays off most when labels are scarce.
    max_train_examples: int = Field(0, ge=0)
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(32, gt=0)
    # Peak AdamW lr (10% linear warm-up, then linear decay); 1e-3 beat 3e-4 from pretrained and scratch alike.
    lr: float = Field(1e-3, gt=0)
    # The encoder body's lr is lr x this (the classifier head keeps lr): < 1 keeps more of what pretraining learned.
    encoder_lr_scale: float = Field(1.0, gt=0)
    # Tokens per window (ids end with eos); at most the encoder's model.max_seq_len. A longer text
    # is read as windows window_stride apart (0 = half a window), at most max_windows of them
    # evenly spread over the text (0 = all), pooled into one vector: never cut silently.
    max_len: int = Field(64, gt=1)
    window_stride: int = Field(0, ge=0)
    max_windows: int = Field(4, ge=0)
    pooling: Literal["mean", "first"] = "mean"
    # Same architecture as the export, random weights: the baseline for what pretraining buys.
    from_scratch: bool = False
    # With from_scratch: input embeddings set from the export's target table (the fastText
    # initialisation without any pretraining): the control that separates the two.
    table_init: bool = False
    # Frozen encoder, only the linear head trained on its pooled vectors: a fast first answer.
    probe: bool = False
    # LP-FT (Kumar et al. 2022): fit the head as the probe does, then fine-tune everything from it, so the
    # first steps do not push a random head's gradients through the pretrained layers.
    probe_first: bool = False
    # TF-IDF + logistic regression (scikit-learn) on the same split, reported beside.
    tfidf_baseline: bool = True
    # auto: CUDA when available, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    # Torch CPU threads; 1 is ~10x faster than 2 for the tiny encoder on shared cores. 0 = torch's default.
    num_threads: int = Field(1, ge=0)


class Config(Section):
    # Everything a run writes goes under workdir unless a section names its own path.
    workdir: str = "runs/tiny"
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if self.train.zero_stage >= 2 and self.train.pipeline_stages > 1:
            raise ValueError(
                f"train.pipeline_stages={self.train.pipeline_stages} needs train.zero_stage 0 or 1 "
                f"(DeepSpeed pipeline parallelism does not support ZeRO-{self.train.zero_stage})"
            )
        if self.train.sparse_embedding:
            from pretrain_kernels.params import WHOLE_TABLE_LOSSES

            blockers = {"train.zero_stage": self.train.zero_stage != 0, "train.precision": self.train.precision != "fp32",
                        "train.pipeline_stages": self.train.pipeline_stages > 1,
                        "model.tie_softmax": self.model.head == "softmax" and self.model.tie_softmax,
                        "loss.name": self.model.head == "continuous" and self.targets.learned and self.loss.name in WHOLE_TABLE_LOSSES}
            if any(blockers.values()):
                # DeepSpeed reduces sparse gradients only in its ZeRO-0 fp32 path (ZeRO-1/2/3, the bf16
                # optimizer and the pipeline flatten every gradient into dense buffers); a tied softmax
                # weight gets a dense gradient from the output layer, and so does a learned target table
                # under the margin loss (it reads negative rows of the whole table).
                raise ValueError("train.sparse_embedding=true needs train.zero_stage=0, train.precision=fp32, "
                                 "train.pipeline_stages=1, model.tie_softmax=false and, with targets.learned, "
                                 f"a loss.name other than {' or '.join(WHOLE_TABLE_LOSSES)} (offending: "
                                 f"{', '.join(k for k, on in blockers.items() if on)}); change those or set "
                                 "train.sparse_embedding=false")
        if self.model.input_embedding == "targets":
            # There is no V x d_model table to make sparse or to tie: refuse rather than ignore. (It
            # starts from the target table by construction, so init_embeddings_from_targets is moot.)
            conflicts = {"train.sparse_embedding": self.train.sparse_embedding,
                         "model.tie_softmax": self.model.head == "softmax" and self.model.tie_softmax}
            for key, on in conflicts.items():
                if on:
                    raise ValueError(f"model.input_embedding=targets reads the frozen target table and has no learned "
                                     f"V x d_model embedding for {key}=true; set {key}=false or model.input_embedding=learned")
        if self.loss.kappa_warmup_steps and self.loss.fused_head:
            raise ValueError("loss.kappa_warmup_steps (the κ schedule) needs loss.fused_head=false")
        if self.loss.kappa_warmup_steps and self.train.pipeline_stages > 1:
            raise ValueError("loss.kappa_warmup_steps (the κ schedule) needs train.pipeline_stages=1")
        if self.train.pipeline_stages > 1:
            unsupported = {
                "model.tie_softmax": self.model.head == "softmax" and self.model.tie_softmax,
                "loss.fused_head": self.model.head == "continuous" and self.loss.fused_head,
                "targets.learned": self.model.head == "continuous" and self.targets.learned,
            }
            for key, on in unsupported.items():
                if on:
                    raise ValueError(f"train.pipeline_stages={self.train.pipeline_stages} does not support {key}=true; "
                                     f"set {key}=false or train.pipeline_stages=1")
            if self.train.pipeline_stages > self.model.n_layers:
                raise ValueError(f"train.pipeline_stages={self.train.pipeline_stages} exceeds model.n_layers="
                                 f"{self.model.n_layers}: every stage needs at least one transformer block")
        # model.max_seq_len against the shards' seq_len: checked before training, from the manifest.
        return self

    @property
    def reads_target_table(self) -> bool:
        """Whether building the model needs the target table (the loss, the input embedding or its init)."""
        return (self.model.head == "continuous" or self.model.init_embeddings_from_targets
                or self.model.input_embedding == "targets")

    # Derived locations -------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir) if self.data.dir else Path(self.workdir) / "data"

    @property
    def targets_path(self) -> Path:
        return Path(self.targets.path) if self.targets.path else Path(self.workdir) / "targets" / "targets.safetensors"

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir) if self.train.run_dir else Path(self.workdir) / "runs" / self.train.run_name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# Loading ---------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 3e-4 as a float (YAML 1.1 insists on a dot: 3.0e-4)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key part")
    # YAML parses numbers, booleans, null and lists ([a, b]) the same way the config files do.
    try:
        value = _yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for depth, part in enumerate(path[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: depth + 1])} is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top level>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; see configs/tiny.yaml for all keys)")
        else:
            got = err.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"  {key}: {err['msg']}{got_s}")
    return "\n".join(lines)


def _coerce_tuples(raw: Any) -> Any:
    # YAML has no tuple; strict mode would refuse a list for train.betas.
    if isinstance(raw, dict):
        return {k: (tuple(v) if k == "betas" and isinstance(v, list) else _coerce_tuples(v)) for k, v in raw.items()}
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(_coerce_tuples(raw))
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (default: configs/tiny.yaml), apply dotted overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (the shipped ones are in {CONFIG_DIR})")
    try:
        raw = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source=f"{path}" + (f" with overrides {overrides}" if overrides else ""))


def resolve_shipped_path(path: str | Path) -> Path:
    """A relative path from the current directory, else from the repository (the shipped data/ files)."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (REPO_ROOT / path).exists():
        return path
    return REPO_ROOT / path


def save_resolved(cfg: Config, directory: str | Path, name: str = "config.resolved.yaml") -> Path:
    """Write the fully resolved config next to a stage's outputs (atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(target)
    return target


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; used for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
