"""`pretrain bench train` runs every head at every vocabulary size and reports the ratio."""
import argparse

from pretrain.bench import train as bench_train


def test_bench_train_reports_tokens_per_second_and_ratios():
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args(["--vocab-sizes", "50,400", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                              "--seq-len", "8", "model.d_model=16", "model.n_heads=2", "model.d_ff=32",
                              "model.n_layers=1", "targets.dim=8", "loss.chunk_size=4"])
    result = bench_train.run(args)
    assert result["device"] == "cpu" and result["seq_len"] == 8 and result["model"]["d_model"] == 16
    small, large = result["results"]
    for row in (small, large):
        for head in ("continuous", "continuous_fused", "softmax"):
            assert row[head]["tokens_per_s"] > 0
        assert row["ratio_continuous_over_softmax"] == round(row["continuous"]["tokens_per_s"] / row["softmax"]["tokens_per_s"], 3)
    # The softmax head grows with the vocabulary, the continuous head does not.
    assert large["softmax"]["head_params"] == 16 * 400 + 400 and small["softmax"]["head_params"] == 16 * 50 + 50
    assert large["continuous"]["head_params"] == small["continuous"]["head_params"] == 16 * 8 + 8
