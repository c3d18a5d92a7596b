"""Fixtures for the target-table tests: a small SentencePiece model and documents encoded with it."""
import gzip
from pathlib import Path

import numpy as np
import pytest

from pretrain.config import REPO_ROOT
from pretrain.data.tokenizer import train_tokenizer
from pretrain.targets.fill import piece_kinds

GLOSSES = REPO_ROOT / "data" / "corpus" / "wordnet_glosses.txt.gz"
N_LINES = 6000


@pytest.fixture(scope="session")
def gloss_lines() -> list[str]:
    with gzip.open(GLOSSES, "rt", encoding="utf-8") as fh:
        return [line.rstrip("\n") for _, line in zip(range(N_LINES), fh) if line.strip()]


@pytest.fixture(scope="session")
def small_sp(tmp_path_factory, gloss_lines):
    """A 600-piece unigram model with the project's special ids and byte fallback."""
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    return train_tokenizer(gloss_lines, path, model_type="unigram", vocab_size=600, character_coverage=0.9995, seed=0, num_threads=1)


@pytest.fixture(scope="session")
def small_vocab(small_sp):
    pieces = [small_sp.id_to_piece(i) for i in range(small_sp.get_piece_size())]
    return pieces, piece_kinds(small_sp)


@pytest.fixture(scope="session")
def gloss_docs(small_sp, gloss_lines) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int64) for ids in small_sp.encode(gloss_lines, out_type=int) if ids]


@pytest.fixture
def single_thread_torch():
    """Tiny training loops run ~30x faster on one thread than fighting over shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
