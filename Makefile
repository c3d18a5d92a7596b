# `make demo` runs the whole pipeline on the embedded corpus; `make test` runs the test suite.
# Both create .venv and install everything on first use.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
PIP     := $(BIN)/pip --disable-pip-version-check
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: install demo test test-fast test-system bench gpu-check system-deps clean

install: $(STAMP)

# torch first, pinned: an unpinned torch (pulled in by deepspeed) is a multi-GB CUDA build.
# DeepSpeed without prebuilt ops: the CPU path needs none, and a GPU machine JIT-compiles them.
# The hf extra (transformers, sentence-transformers, scikit-learn) with torch held at the pinned version.
$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH)
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation deepspeed==0.19.8
	echo '$(TORCH)' > $(VENV)/torch-constraint.txt
	$(PIP) install -q -c $(VENV)/torch-constraint.txt -e '.[dev,data,hf]'
	touch $(STAMP)

demo: install
	$(BIN)/pretrain demo

test: install
	$(BIN)/python -m pytest tests

# Leaves out the heavy system tests (SLURM daemons, MLflow server, headless Chromium).
test-fast: install
	$(BIN)/python -m pytest tests -m "not system"

test-system: install system-deps
	$(BIN)/python -m pytest tests -m system

bench: install
	$(BIN)/pretrain bench all

# One GPU machine, from a fresh clone (<= 8 min): kernels on CUDA, bench loss/decode, kernel bandwidth and
# a 50-step bf16 training run -> gpu-check/gpu_check.json and gpu_check.md. The GPU extras (FAISS GPU,
# the fused cross-entropy peers) are optional: a part that needs a missing one says so in the report.
# CPU_SMOKE=1: every part on tiny shapes on the CPU (CI runs it via tests/test_gpu_check.py).
gpu-check: install
	$(if $(CPU_SMOKE),,-$(PIP) install -q -c $(VENV)/torch-constraint.txt -e '.[gpu]')
	$(if $(CPU_SMOKE),,-$(PIP) install -q -c $(VENV)/torch-constraint.txt -e '.[bench]')
	$(BIN)/python scripts/gpu_check.py --out gpu-check $(if $(CPU_SMOKE),--cpu-smoke)

# Debian packages the system tests start for real (needs root; CI runs it).
system-deps:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge chromium python3.11-doc fortunes >/dev/null

clean:
	rm -rf $(VENV) runs build *.egg-info
