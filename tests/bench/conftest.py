"""A small synthetic `pretrain bench all` results dict, shaped like the suites' real JSON."""
import copy

import pytest

_RESULTS = {
    "hardware": {"cpu": "Test CPU", "cores": 2, "torch": "2.x", "date": "2030-01-01T00:00:00+00:00", "load_average": [1.5, 1.0, 0.5]},
    "suite_args": {"loss": ["--threads", "1"]},
    "suites": {
        "loss": {
            "suite": "loss", "device": "cpu", "clock": "process_cpu_time", "repeats": 5,
            "load_average": {"before": [1.5, 1.0, 0.5], "after": [1.6, 1.1, 0.5]},
            "shape": {"tokens": 64, "hidden": 32, "dims": [8], "dtype": "fp32", "chunk_size": 16, "impl": "auto", "cpu_threads": 1},
            "results": {  # softmax grows with V; cosine is flat
                "1024": {"softmax": {"ms": 100.0, "min_ms": 90.0, "max_ms": 130.0, "peak_mib": 8.0},
                         "softmax_chunked": {"ms": 125.0, "min_ms": 120.0, "max_ms": 140.0, "peak_mib": 4.0},
                         "liger": {"skipped": "not measured: no CUDA device"},
                         "cosine D8": {"ms": 2.0, "min_ms": 1.5, "max_ms": 3.0, "peak_mib": 1.0, "dim": 8},
                         "cosine+fused D8": {"ms": 4.0, "min_ms": 3.5, "max_ms": 5.0, "peak_mib": 0.5, "dim": 8}},
                "4096": {"softmax": {"ms": 400.0, "min_ms": 390.0, "max_ms": 420.0, "peak_mib": 32.0},
                         "softmax_chunked": {"ms": 500.0, "min_ms": 480.0, "max_ms": 530.0, "peak_mib": 16.0},
                         "liger": {"skipped": "not measured: no CUDA device"},
                         "cosine D8": {"ms": 2.0, "min_ms": 1.9, "max_ms": 2.5, "peak_mib": 1.0, "dim": 8},
                         "cosine+fused D8": {"ms": 5.0, "min_ms": 4.0, "max_ms": 6.0, "peak_mib": 0.5, "dim": 8}},
            },
            "ratios": {},
            "kernels": "not measured: no CUDA device",
            "suite_seconds": 1.5,
        },
        "train": {
            "suite": "train", "device": "cpu", "objective": "causal", "loss": "vmf_practice", "optimizer": "sparse",
            "clock": "process_cpu_time", "repeats": 5, "load_average": {"before": [1.0, 1.0, 1.0], "after": [1.0, 1.0, 1.0]},
            "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}, "target_dim": 8, "batch_size": 2, "seq_len": 8,
            "results": [
                {"vocab_size": 4000, "continuous": {"tokens_per_s": 300.0, "step_ms": 1, "head_params": 136, "forward_ms": 0.2,
                                                    "backward_ms": 0.3, "optimizer_ms": 0.1},
                 "continuous_fused": {"tokens_per_s": 240.0, "step_ms": 1, "head_params": 136},
                 "softmax": {"tokens_per_s": 200.0, "step_ms": 1, "head_params": 68000, "forward_ms": 0.3, "backward_ms": 0.5,
                             "optimizer_ms": 0.2},
                 "flop_ideal_continuous_over_softmax": 2.0, "flop_ideal_continuous_fused_over_softmax": 2.0},
                {"vocab_size": 16000, "continuous": {"tokens_per_s": 280.0, "step_ms": 1, "head_params": 136},
                 "continuous_fused": {"tokens_per_s": 210.0, "step_ms": 1, "head_params": 136},
                 "softmax": {"tokens_per_s": 70.0, "step_ms": 1, "head_params": 272000, "forward_ms": 1.0, "backward_ms": 2.0,
                             "optimizer_ms": 0.5},
                 "flop_ideal_continuous_over_softmax": 5.0, "flop_ideal_continuous_fused_over_softmax": 5.0,
                 "ratio_continuous_over_softmax": 3.9},  # the suite's paired ratio wins over 280 / 70
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
