"""Shared test set-up.

TRITON_INTERPRET must be set before any @triton.jit function is decorated, i.e. before the
kernels are imported: on CPU the Triton kernels then run in Triton's interpreter.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# DeepSpeed on CPU: never fall back to MPI discovery, never JIT-compile ops in tests.
os.environ.setdefault("DS_BUILD_OPS", "0")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A prepared dataset (pretrain.config.Config; its data_dir holds it) from the first ~400 KB of the
    demo corpus: vocab 1000, seq_len 32, 256 samples per shard (~18 train and 2 valid shards)."""
    import gzip

    from pretrain.config import load_config
    from pretrain.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("tiny_data")
    with gzip.open(REPO_ROOT / "data" / "corpus" / "wordnet_glosses.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read(400_000)
    corpus = root / "corpus.txt"
    corpus.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    cfg = load_config(
        None,
        [
            f"workdir={root / 'work'}",
            f"data.corpus=[{corpus}]",
            "tokenizer.vocab_size=1000",
            "data.seq_len=32",
            "data.samples_per_shard=256",
            "data.valid_fraction=0.1",
            "model.max_seq_len=32",
        ],
    )
    prepare_dataset(cfg, progress=False)
    return cfg


@pytest.fixture(scope="session")
def tiny_runs(tiny_data, tmp_path_factory):
    """Trained tiny checkpoints (engine area): {name: SimpleNamespace(run_dir=Path, cfg=Config)}.

    2 processes each, 16 steps, checkpoints at steps 8 and 16, tiny encoder (d_model 32, 2 layers),
    random target table (dim 16, vmf_practice loss). Names: "zero2", "zero3" (continuous head, masked),
    "softmax" (ZeRO-2, softmax head), "zero1" (causal, bf16, grad_accum 2), "zero0" (bf16), "sparse" (ZeRO-0, causal, row-sparse input embedding and learned target table), "pipeline" (2 stages, ZeRO-1), "learned" (ZeRO-3, learned
    targets, contrastive remedy: meta["targets_path"] names the checkpoint's own targets.safetensors),
    "table_input", "table_input_softmax", "table_input_learned", "table_input_pipeline" (model.input_embedding=targets
    under ZeRO-2, ZeRO-3 + bf16 softmax, ZeRO-3 learned targets, 2 pipeline stages).
    See tests/engine/tiny_runs.py; about 60 s on 2 cores.
    """
    import json
    import subprocess
    import sys
    import types

    from pretrain.config import load_config, save_resolved

    out = tmp_path_factory.mktemp("tiny_runs")
    data_config = save_resolved(tiny_data, out, name="tiny_data.yaml")
    script = REPO_ROOT / "tests" / "engine" / "tiny_runs.py"
    subprocess.run([sys.executable, str(script), str(out), str(data_config)], check=True, timeout=900)
    runs = json.loads((out / "runs.json").read_text())
    return {n: types.SimpleNamespace(run_dir=Path(d), cfg=load_config(Path(d) / "config.resolved.yaml")) for n, d in runs.items()}


@pytest.fixture(scope="session")
def tiny_targets(tiny_data):
    """tiny_data (the same Config) plus its target table at cfg.targets_path, built as `pretrain targets`
    does: fastText over the train shards, dim 64, 2 epochs (~5 s); report.json next to it."""
    from pretrain.targets.build import build_targets

    build_targets(tiny_data, progress=False)
    return tiny_data
