"""`pretrain bench loss` on a toy shape: the JSON it prints, the ratios, the plot, memory flat in V."""
import argparse
import json

from pretrain.bench import loss as bench_loss
from pretrain.cli import main


def test_bench_loss_reports_ratios_and_flat_continuous_memory(tmp_path):
    parser = argparse.ArgumentParser()
    bench_loss.add_arguments(parser)
    plot = tmp_path / "loss.png"
    args = parser.parse_args(
        ["--vocab-sizes", "512", "4096", "--tokens", "32", "--hidden", "16", "--dim", "8", "--chunk-size", "8",
         "--losses", "cosine", "margin", "--repeats", "1", "--plot", str(plot)]
    )
    out = bench_loss.run(args)
    json.dumps(out)  # printable as JSON
    assert plot.stat().st_size > 0
    small, large = out["results"]["512"], out["results"]["4096"]
    assert set(small) == {"softmax", "softmax_chunked", "cosine", "cosine+fused", "margin", "margin+fused"}
    for rows in (small, large):
        assert all(row["ms"] > 0 and row["peak_mib"] is not None for row in rows.values())
    # The softmax head's logits and weight gradient grow with V; the cosine head's memory does not.
    assert large["softmax"]["peak_mib"] > 4 * small["softmax"]["peak_mib"]
    assert large["cosine"]["peak_mib"] == small["cosine"]["peak_mib"]
    assert large["cosine+fused"]["peak_mib"] == small["cosine+fused"]["peak_mib"]
    ratio = out["ratios"]["4096"]["cosine"]
    assert ratio["time_softmax_over_continuous"] > 0 and ratio["memory_softmax_over_continuous"] > 1
    assert out["kernels"].startswith("not measured")


def test_bench_loss_rejects_a_bad_shape(capsys):
    assert main(["bench", "loss", "--dim", "2", "--plot", ""]) == 1
    assert "--dim at least 4" in capsys.readouterr().err


def test_kernel_timing_path_runs_under_the_interpreter():
    """The Triton-vs-reference timing only runs on CUDA in `bench loss`; here its code runs on CPU tensors
    (TRITON_INTERPRET=1) on a toy shape, so a GPU machine does not meet it for the first time."""
    import torch

    parser = argparse.ArgumentParser()
    bench_loss.add_arguments(parser)
    args = parser.parse_args(["--vocab-sizes", "64", "--tokens", "16", "--hidden", "8", "--dim", "8", "--chunk-size", "8",
                              "--losses", "cosine", "vmf_practice", "margin", "--repeats", "1"])
    out = bench_loss._bench_kernels(args, torch.device("cpu"), torch.float32)
    json.dumps(out)
    assert out["vocab"] == 64 and out["peak_bandwidth_gb_s"] is None  # no peak bandwidth off CUDA
    assert set(out["losses"]) == {"cosine", "vmf_practice", "margin", "cosine+fused", "vmf_practice+fused"}
    for name, row in out["losses"].items():
        assert row["triton_ms"] > 0 and row["reference_ms"] > 0 and row["speedup"] > 0
    # Bandwidth of the streaming kernels only (the margin's search is compute-bound); tiny here, so just present.
    assert out["losses"]["cosine"]["kernel_ms"] > 0 and out["losses"]["cosine"]["achieved_gb_s"] >= 0
    assert "kernel_ms" not in out["losses"]["margin"]
