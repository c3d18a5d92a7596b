"""`pretrain bench loss` on a toy shape: the JSON it prints, the peers, the ratios, the plot, memory flat in V."""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from pretrain.bench import loss as bench_loss
from pretrain.cli import main


def _args(argv):
    parser = argparse.ArgumentParser()
    bench_loss.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_loss_reports_peers_ratios_and_flat_continuous_memory(tmp_path):
    plot = tmp_path / "loss.png"
    args = _args(["--vocab-sizes", "512", "4096", "--tokens", "32", "--hidden", "16", "--dims", "8", "16", "--chunk-size", "8",
                  "--losses", "cosine", "margin", "--plot", str(plot)])
    out = bench_loss.run(args)
    json.dumps(out)  # printable as JSON
    assert plot.stat().st_size > 0
    assert out["clock"] == "process_cpu_time" and out["repeats"] == 5 and len(out["load_average"]["before"]) == 3
    small, large = out["results"]["512"], out["results"]["4096"]
    continuous = {f"{k}{fused} D{d}" for k in ("cosine", "margin") for fused in ("", "+fused") for d in (8, 16)}
    assert set(small) == {"softmax", "softmax_chunked", "adaptive_softmax", "liger", "cce"} | continuous
    assert small["liger"] == {"skipped": "not measured: no CUDA device"}  # GPU peers: said, not silently absent
    for rows in (small, large):
        for row in (r for r in rows.values() if "skipped" not in r):
            assert row["min_ms"] <= row["ms"] <= row["max_ms"] and row["repeats"] == 5 and row["peak_mib"] is not None
    # The softmax head's logits and weight gradient grow with V; the cosine head's memory does not.
    assert large["softmax"]["peak_mib"] > 4 * small["softmax"]["peak_mib"]
    assert large["cosine D8"]["peak_mib"] == small["cosine D8"]["peak_mib"]
    assert large["cosine+fused D8"]["peak_mib"] == small["cosine+fused D8"]["peak_mib"]
    # The chunked CE holds one V x H weight gradient, not the N x V logits and their gradient.
    assert large["softmax_chunked"]["peak_mib"] < large["softmax"]["peak_mib"]
    ratio = out["ratios"]["4096"]["cosine D16"]
    assert ratio["flop_ideal_v_over_d"] == 256.0
    assert ratio["time_softmax_over_continuous"] == round(large["softmax"]["ms"] / large["cosine D16"]["ms"], 2)
    assert ratio["memory_softmax_over_continuous"] > 1 and "time_adaptive_softmax_over_continuous" in ratio
    assert out["kernels"].startswith("not measured")


def test_chunked_linear_cross_entropy_matches_cross_entropy_and_its_gradients():
    """Liger-style: gradients made in the forward, scaled in the backward (rows not a multiple of the chunk)."""
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 16, generator=gen), torch.randn(50, 16, generator=gen)
    targets = torch.randint(0, 50, (37,), generator=gen)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = bench_loss.ChunkedLinearCrossEntropy.apply(h, w, targets, 8)
    (ours * 3).backward()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    reference = F.cross_entropy(h_ref @ w_ref.T, targets)
    (reference * 3).backward()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(h.grad, h_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_adaptive_cutoffs_scale_grave_et_al_to_the_vocabulary():
    assert bench_loss.adaptive_cutoffs(131072) == [2048, 10923, 50412]
    assert all(c < 100 for c in bench_loss.adaptive_cutoffs(100))


def test_zipf_targets_make_low_ids_frequent():
    ids = bench_loss.zipf_targets(1000, 5000, torch.Generator().manual_seed(0))
    assert ids.min() >= 0 and ids.max() < 1000
    assert (ids < 10).float().mean() > 0.3  # Zipf(1) over 1000 ids: about 39% in the first ten


@pytest.mark.parametrize("argv, message", [(["--dims", "2"], "--dims at least 4"), (["--repeats", "3"], "at least 5 repeats")])
def test_bench_loss_rejects_a_bad_shape_or_too_few_repeats(argv, message, capsys):
    assert main(["bench", "loss", "--vocab-sizes", "64", "--tokens", "8", "--hidden", "8", "--plot", "", *argv]) == 1
    assert message in capsys.readouterr().err


def test_kernel_timing_path_runs_under_the_interpreter():
    """The Triton-vs-reference timing only runs on CUDA in `bench loss`; here its code runs on CPU tensors
    (TRITON_INTERPRET=1) on a toy shape, so a GPU machine does not meet it for the first time."""
    args = _args(["--vocab-sizes", "64", "--tokens", "16", "--hidden", "8", "--dims", "8", "--chunk-size", "8",
                  "--losses", "cosine", "vmf_practice", "margin"])
    out = bench_loss._bench_kernels(args, torch.device("cpu"), torch.float32)
    json.dumps(out)
    assert out["vocab"] == 64 and out["dim"] == 8 and out["peak_bandwidth_gb_s"] is None  # no peak bandwidth off CUDA
    assert set(out["losses"]) == {"cosine", "vmf_practice", "margin", "cosine+fused", "vmf_practice+fused"}
    for row in out["losses"].values():
        assert row["triton_ms"] > 0 and row["reference_ms"] > 0 and row["speedup"] > 0
        assert row["triton_min_max_ms"][0] <= row["triton_ms"] <= row["triton_min_max_ms"][1]
    # Bandwidth of the streaming kernels only (the margin's search is compute-bound); tiny here, so just present.
    assert out["losses"]["cosine"]["kernel_ms"] > 0 and out["losses"]["cosine"]["achieved_gb_s"] >= 0
    assert "kernel_ms" not in out["losses"]["margin"]
