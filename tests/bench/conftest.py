"""A small synthetic `pretrain bench all` results dict, shaped like the suites' real JSON."""
import copy

import pytest

_RESULTS = {
    "hardware": {"cpu": "Test CPU", "cores": 2, "torch": "2.x", "date": "2030-01-01T00:00:00+00:00", "load_average": [1.5, 1.0, 0.5]},
    "suite_args": {"loss": ["--threads", "1"]},
    "suites": {
        "loss": {
            "suite": "loss", "device": "cpu",
            "shape": {"tokens": 64, "hidden": 32, "dim": 8, "dtype": "fp32", "chunk_size": 16, "impl": "auto", "cpu_threads": 1},
            "results": {  # softmax grows with V; cosine is flat
                "1024": {"softmax": {"ms": 100.0, "peak_mib": 8.0}, "softmax_chunked": {"ms": 125.0, "peak_mib": 4.0},
                         "cosine": {"ms": 2.0, "peak_mib": 1.0}, "cosine+fused": {"ms": 4.0, "peak_mib": 0.5}},
                "4096": {"softmax": {"ms": 400.0, "peak_mib": 32.0}, "softmax_chunked": {"ms": 500.0, "peak_mib": 16.0},
                         "cosine": {"ms": 2.0, "peak_mib": 1.0}, "cosine+fused": {"ms": 5.0, "peak_mib": 0.5}},
            },
            "ratios": {},
            "kernels": "not measured: no CUDA device",
            "suite_seconds": 1.5,
        },
        "train": {
            "suite": "train", "device": "cpu", "objective": "causal", "loss": "vmf_practice",
            "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}, "target_dim": 8, "batch_size": 2, "seq_len": 8,
            "results": [
                {"vocab_size": 4000, "continuous": {"tokens_per_s": 300.0, "step_ms": 1, "head_params": 136},
                 "continuous_fused": {"tokens_per_s": 240.0, "step_ms": 1, "head_params": 136},
                 "softmax": {"tokens_per_s": 200.0, "step_ms": 1, "head_params": 68000}},
                {"vocab_size": 16000, "continuous": {"tokens_per_s": 280.0, "step_ms": 1, "head_params": 136},
                 "continuous_fused": {"tokens_per_s": 210.0, "step_ms": 1, "head_params": 136},
                 "softmax": {"tokens_per_s": 70.0, "step_ms": 1, "head_params": 272000}},
            ],
        },
        "decode": {
            "suite": "decode", "dim": 8, "queries": 16, "k": 5, "threads": {"faiss_omp": 2, "torch": 2}, "faiss_version": "1.x",
            "faiss_gpus": 0,
            "results": [
                {"vocab_size": 1024, "methods": {"torch_cpu": {"vectors_per_s": 1000.0}, "faiss_flat_cpu": {"vectors_per_s": 1500.0}}},
                {"vocab_size": 4096, "methods": {"torch_cpu": {"vectors_per_s": 250.0}, "faiss_flat_cpu": {"vectors_per_s": 500.0}}},
            ],
        },
        "data": {
            "suite": "data", "corpus_mb": 0.3, "seq_len": 16, "train_samples": 1234, "tokenizer_train_s": 0.5,
            "prepare_encode_pack_write": {"mb_per_s": 1.5, "tokens_per_s": 50000.0, "threads": 2},
            "sentencepiece_encode": {"threads_1": {"mb_per_s": 10.0, "tokens_per_s": 1e6},
                                     "threads_2": {"mb_per_s": 18.0, "tokens_per_s": 1.8e6}, "threads_ratio": 1.8},
            "read_shards_one_process": {"samples_per_s": 9000.0, "tokens_per_s": 144000.0},
            "streaming": {"workers_0": {"first_batch_s": 0.1, "samples_per_s": 4000.0, "tokens_per_s": 64000.0,
                                        "restored_first_batch_s": 0.2, "samples_per_s_ratio_vs_workers_0": 1.0}},
        },
    },
}


@pytest.fixture
def synthetic_results() -> dict:
    return copy.deepcopy(_RESULTS)
