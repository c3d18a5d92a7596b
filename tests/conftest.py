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
