"""The benchmark report: results.md tables with ratios computed from the numbers, and valid PNG plots."""
import json

import matplotlib.image
import pytest

from pretrain.bench import report
from pretrain.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _table_rows(markdown: str, first_header: str) -> list[list[str]]:
    """Cells of the body rows of the table whose header starts with first_header."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_report_writes_the_table_and_valid_pngs(tmp_path, synthetic_results):
    written = report.write_report(synthetic_results, tmp_path)
    pngs = {p.name for p in written if p.suffix == ".png"}
    assert pngs == {"loss_time_vs_vocab.png", "loss_memory_vs_vocab.png", "train_tokens_per_s_vs_vocab.png",
                    "decode_vectors_per_s_vs_vocab.png"}
    for name in pngs:
        path = tmp_path / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = matplotlib.image.imread(path).shape
        assert width >= 800 and height >= 500  # readable, not a thumbnail

    markdown = (tmp_path / "results.md").read_text()
    assert "Test CPU (2 cores), no GPU, torch 2.x" in markdown and "2030-01-01" in markdown
    # Loss: every measured (V, head), ratios softmax (and chunked CE) / head recomputed from ms and MiB, FLOP-ideal V/D.
    loss = {(r[0], r[1]): r[2:] for r in _table_rows(markdown, "V | head")}
    assert len(loss) == 8  # the skipped GPU peer is a note, not a row
    assert loss[("4k", "cosine D8")] == ["2.00 [1.90, 2.50]", "1.00", "200×", "512×", "250×", "32.0×", "16.0×"]
    assert loss[("1k", "cosine+fused D8")] == ["4.00 [3.50, 5.00]", "0.50", "25.0×", "128×", "31.2×", "16.0×", "8.00×"]
    assert loss[("4k", "softmax_chunked")] == ["500 [480, 530]", "16.0", "0.80×", "", "1.00×", "2.00×", "1.00×"]
    assert "liger: not measured: no CUDA device." in markdown
    assert "clock: process CPU time; median [min, max] of 5 repeats; load average 1.5 / 1.0 / 0.5 before" in markdown
    # Training: tokens/s per head, continuous / softmax beside the FLOP-ideal ratio, phases.
    train = _table_rows(markdown, "V | continuous tokens/s")
    assert train[0] == ["4k", "300", "240", "200", "1.50× (ideal 2.00×)", "1.20× (ideal 2.00×)", "0.20 / 0.30 / 0.10", "n/a",
                        "0.30 / 0.50 / 0.20", "68,000"]
    assert train[1][4] == "3.90× (ideal 5.00×)"  # the suite's own (paired) ratio, not 280 / 70
    # Decoding: FAISS over torch on the same device.
    decode = _table_rows(markdown, "V | torch_cpu vectors/s")
    assert decode == [["1k", "1,000", "1,500", "1.50×"], ["4k", "250", "500", "2.00×"]]
    data = {r[0]: r[1:] for r in _table_rows(markdown, "stage")}
    assert data["SentencePiece encode, 2 threads"][2] == "all threads / 1: 1.80×"
    # Headline ratios at the largest V, and the plots linked relatively.
    assert ("Head + loss at V=4k, N=64, H=32, softmax / continuous: cosine D8 200× time (FLOP-ideal 512×), 32.0× memory "
            "(16.0× against the chunked CE).") in markdown
    assert ("Training tokens/s at V=16k, d_model 16, batch 2×8, continuous / softmax: continuous 3.90× (FLOP-ideal 5.00×), "
            "continuous_fused 3.00× (FLOP-ideal 5.00×).") in markdown
    for name in pngs:
        assert f"]({name})" in markdown


def test_report_shows_a_failed_suite_and_draws_no_plot_for_it(tmp_path, synthetic_results):
    synthetic_results["suites"]["train"] = {"suite": "train", "error": "RuntimeError: out of memory", "suite_seconds": 0.1}
    del synthetic_results["suites"]["decode"]
    written = {p.name for p in report.write_report(synthetic_results, tmp_path)}
    assert "train_tokens_per_s_vs_vocab.png" not in written and "decode_vectors_per_s_vs_vocab.png" not in written
    assert "loss_time_vs_vocab.png" in written
    markdown = (tmp_path / "results.md").read_text()
    assert "`pretrain bench train` failed" in markdown and "RuntimeError: out of memory" in markdown
    assert "Training tokens/s" not in markdown and "Nearest-neighbour" not in markdown


def test_bench_report_command_rebuilds_from_json(tmp_path, synthetic_results, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(synthetic_results))
    assert main(["bench", "report", str(results), "--out-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "results.md").read_text() == report.markdown_report(synthetic_results, tmp_path / "out")
    assert (tmp_path / "out" / "loss_memory_vs_vocab.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    (None, "run `pretrain bench all` first"),
    ("{not json", "is not valid JSON"),
    ('{"hardware": {}}', "has no 'suites' object"),
    ('{"suites": {"loss": {"device": "cpu"}}}', "lack what the report reads"),
])
def test_bench_report_rejects_a_missing_or_bad_results_file(tmp_path, capsys, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    assert main(["bench", "report", str(path)]) == 1
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_metrics_and_params_flatten_per_vocabulary_rows(synthetic_results):
    metrics, params = report.metrics_and_params(synthetic_results)
    assert metrics["loss.results.4096.cosine D8.ms"] == 2.0
    assert metrics["train.results.16000.softmax.tokens_per_s"] == 70.0  # list rows keyed by vocab_size
    assert metrics["decode.results.1024.methods.faiss_flat_cpu.vectors_per_s"] == 1500.0
    assert params["loss.device"] == "cpu" and params["hardware.cpu"] == "Test CPU"
    assert params["args.loss"] == "--threads 1" and params["hardware.load_average"] == "[1.5, 1.0, 0.5]"
    assert "loss.device" not in metrics and all(isinstance(v, (int, float)) for v in metrics.values())


def test_report_of_a_cuda_run_has_the_kernel_table_and_the_gpu(tmp_path, synthetic_results):
    synthetic_results["hardware"].update(gpu="Test GPU", gpu_count=8)
    synthetic_results["suites"]["loss"]["kernels"] = {
        "vocab": 4096, "peak_bandwidth_gb_s": 3000.0,
        "losses": {"cosine": {"triton_ms": 0.5, "reference_ms": 1.5, "speedup": 3.0, "achieved_gb_s": 1500.0,
                              "fraction_of_peak_bandwidth": 0.5},
                   "cosine+fused": {"triton_ms": 2.0, "reference_ms": 3.0, "speedup": 1.5}},
    }
    markdown = report.markdown_report(synthetic_results)
    assert "8 × Test GPU" in markdown
    kernels = {r[0]: r[1:] for r in _table_rows(markdown, "loss | Triton ms")}
    assert kernels == {"cosine": ["0.50", "1.50", "3.00×", "1,500", "0.50"], "cosine+fused": ["2.00", "3.00", "1.50×", "n/a", "n/a"]}
