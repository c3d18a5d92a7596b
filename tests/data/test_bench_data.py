"""`pretrain bench data` runs end to end on a small slice and reports every number it promises."""
import json

from pretrain.cli import main


def test_bench_data_prints_throughput_json(capsys):
    argv = ["bench", "data", "--mb", "0.3", "--vocab-size", "500", "--batches", "5", "--workers", "0", "1", "--batch-size", "8", "--processes", "1", "2"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    scaling = result["prepare_processes"]
    assert scaling["identical_output"] is True and scaling["parts"] >= 8 and scaling["repeats"] == 5
    for n in (1, 2):
        row = scaling[f"processes_{n}"]
        assert row["mb_per_s_min_max"][0] <= row["mb_per_s"] <= row["mb_per_s_min_max"][1] and row["tokens_per_s"] > 0
        assert row["ideal_ratio"] == min(n, scaling["cores"]) and row["ratio_vs_processes_1"] > 0
    assert result["prepare_encode_pack_write"]["tokens_per_s"] > 0 and result["prepare_encode_pack_write"]["mb_per_s"] > 0
    assert result["sentencepiece_encode"]["threads_1"]["tokens_per_s"] > 0
    for name in ("workers_0", "workers_1"):
        row = result["streaming"][name]
        assert row["samples_per_s"] > 0 and row["tokens_per_s"] > 0 and row["restored_first_batch_s"] > 0
    assert result["streaming"]["workers_0"]["samples_per_s_ratio_vs_workers_0"] == 1.0
    assert result["hardware"]["cores"] >= 1


def test_bench_data_refuses_arguments_that_would_never_finish(tmp_path, capsys):
    # --batches 0 used to time an infinite loader forever.
    assert main(["bench", "data", "--batches", "0"]) == 1
    assert "--batches and --batch-size at least 1" in capsys.readouterr().err
    assert main(["bench", "data", "--corpus", str(tmp_path / "none.txt")]) == 1
    assert "none.txt not found" in capsys.readouterr().err
