"""`pretrain bench decode` on a tiny table: the JSON it prints has every method, ratio and check."""
import argparse
import json

from pretrain.bench import decode
from pretrain.cli import main


def test_bench_decode_reports_throughput_ratios_and_recall(tmp_path):
    parser = argparse.ArgumentParser()
    decode.add_arguments(parser)
    args = parser.parse_args(
        ["--vocab-sizes", "1500", "3000", "--dim", "24", "--queries", "64", "--approx",
         "--ivf-nlist", "16", "--ivf-nprobe", "16", "--hnsw-m", "8", "--plot", str(tmp_path / "decode.png")]
    )
    out = decode.run(args)
    assert [r["vocab_size"] for r in out["results"]] == [1500, 3000]
    assert out["clock"] == "process_cpu_time" and len(out["load_average"]["after"]) == 3
    for result in out["results"]:
        methods = result["methods"]
        assert {"torch_cpu", "faiss_flat_cpu", "faiss_ivf_cpu", "faiss_hnsw_cpu"} <= set(methods)
        assert all(m["vectors_per_s"] > 0 and m["min_ms"] <= m["ms"] <= m["max_ms"] and m["repeats"] == 5
                   for m in methods.values())
        # Exact FAISS and torch agree on every query; IVF probing all 16 lists is exact too.
        assert methods["faiss_flat_cpu"]["top1_agreement_with_torch"] == 1.0
        assert methods["faiss_ivf_cpu"]["recall@5"] == 1.0
        assert 0.0 <= methods["faiss_hnsw_cpu"]["recall@5"] <= 1.0
        ratio = result["ratios"]["faiss_flat_cpu_vs_torch_cpu"]
        assert abs(ratio - methods["faiss_flat_cpu"]["vectors_per_s"] / methods["torch_cpu"]["vectors_per_s"]) < 1e-2
    assert (tmp_path / "decode.png").stat().st_size > 0


def test_bench_decode_via_the_cli(capsys, tmp_path):
    rc = main(["bench", "decode", "--vocab-sizes", "500", "--dim", "16", "--queries", "32", "--plot", ""])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["suite"] == "decode" and "hardware" in printed and "plot" not in printed
