"""`pretrain bench train`: every head at every vocabulary size, phases, FLOP-ideal ratio, engine overhead."""
import argparse
import json
import subprocess
import sys

import pytest

from pretrain.bench import train as bench_train
from pretrain.cli import main
from pretrain.config import load_config

TINY = ["--batch-size", "2", "--seq-len", "8", "--warmup", "1", "model.d_model=16", "model.n_heads=2", "model.d_ff=32",
        "model.n_layers=1", "targets.dim=8", "loss.chunk_size=4"]


def _run(argv):
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    return bench_train.run(parser.parse_args([*argv, *TINY]))


def test_bench_train_reports_phases_ratios_and_the_flop_ideal_ratio():
    result = _run(["--vocab-sizes", "50,400"])
    assert result["device"] == "cpu" and result["seq_len"] == 8 and result["model"]["d_model"] == 16
    assert result["clock"] == "process_cpu_time" and result["optimizer"] == "sparse" and result["repeats"] == 9
    assert result["allocator_pinned"] == {"mmap_threshold_bytes": 32 * 2**20, "trim_threshold_bytes": 2**31 - 1}  # glibc here
    small, large = result["results"]
    for row in (small, large):
        for head in ("continuous", "continuous_fused", "softmax"):
            cell = row[head]
            assert cell["tokens_per_s"] > 0 and cell["step_min_max_ms"][0] <= cell["step_ms"] <= cell["step_min_max_ms"][1]
            assert all(cell[f"{phase}_ms"] >= 0 for phase in bench_train.PHASES)
        low, high = row["ratio_continuous_over_softmax_min_max"]
        assert low <= row["ratio_continuous_over_softmax"] <= high  # the median of the rounds' own ratios
        assert row["fraction_of_flop_ideal_continuous"] == pytest.approx(
            row["ratio_continuous_over_softmax"] / row["flop_ideal_continuous_over_softmax"], abs=2e-3)
    # The softmax head grows with the vocabulary, the continuous head does not; so does the ideal ratio.
    assert large["softmax"]["head_params"] == 16 * 400 + 400 and small["softmax"]["head_params"] == 16 * 50 + 50
    assert large["continuous"]["head_params"] == small["continuous"]["head_params"] == 16 * 8 + 8
    assert large["flop_ideal_continuous_over_softmax"] > small["flop_ideal_continuous_over_softmax"] > 1


def test_flop_ideal_ratio_of_the_issue_shape():
    """d_model 128, 2 layers, d_ff 512, 64 positions, D=64: the issue's 2.19 at 4k and 39.6 at 128k."""
    overrides = ["model.d_model=128", "model.n_layers=2", "model.d_ff=512", "targets.dim=64"]
    softmax, continuous = (load_config(None, [*overrides, f"model.head={h}"]) for h in ("softmax", "continuous"))
    ratio = {v: bench_train.flops_per_token(softmax, v, 64) / bench_train.flops_per_token(continuous, v, 64) for v in (4096, 131072)}
    assert ratio[4096] == pytest.approx(2.19, abs=0.01) and ratio[131072] == pytest.approx(39.6, abs=0.1)


def test_sparse_optimizer_keeps_untouched_embedding_rows_of_every_head():
    """The fair A/B: both heads' input embeddings take the row-sparse step under --optimizer sparse."""
    cfg = load_config(None, ["model.d_model=16", "model.n_heads=2", "model.d_ff=32", "model.n_layers=1", "targets.dim=8",
                             *bench_train.OPTIMIZERS["sparse"], *bench_train.HEADS["softmax"]])
    model = bench_train.TimedModel(cfg, 400, bench_train.torch.device("cpu"), 2, 8, "sparse")
    table = model.model.encoder.embed.tok_emb.weight
    before = table.detach().clone()
    model.step(record=True)
    used = model.batch["input_ids"].unique()
    unused = [i for i in range(400) if i not in set(used.tolist())]
    assert table.grad is None and not bench_train.torch.equal(table[used], before[used])
    assert bench_train.torch.equal(table[unused], before[unused])


def test_engine_overhead_is_measured_against_the_bare_step(capsys):
    """Through the CLI: stdout is the JSON alone, although DeepSpeed logs to stdout while it starts."""
    assert main(["bench", "train", "--vocab-sizes", "50", "--heads", "continuous", "--engine", *TINY]) == 0
    engine = json.loads(capsys.readouterr().out)["engine"]
    assert engine["bare"]["step_ms"] > 0 and engine["deepspeed"]["step_ms"] > 0
    assert engine["overhead_fraction"] == pytest.approx(engine["deepspeed"]["step_ms"] / engine["bare"]["step_ms"] - 1, abs=2e-3)
    # One replica: DeepSpeed's own gradient all-reduce (and the sparse all-gathers) are off; the NaN guard's
    # flag and the clipping norm remain.
    assert engine["single_replica_allreduce_skipped"] and "all_gather" not in engine["collectives_per_step"]


def test_table_input_runs_both_heads_with_nothing_vocabulary_sized_in_the_continuous_model():
    """--input-embedding targets: the frozen table + adapter for every model; the ZeRO-2 engine takes it too
    (its own process: DeepSpeed keeps a cached world group that a second engine in one process trips on)."""
    argv = ["bench", "train", "--vocab-sizes", "400", "--heads", "continuous,softmax", "--optimizer", "fused",
            "--input-embedding", "targets", "--engine", *TINY, "train.zero_stage=2"]
    done = subprocess.run([sys.executable, "-m", "pretrain", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["input_embedding"] == "targets" and result["engine"]["zero_stage"] == 2
    assert result["results"][0]["ratio_continuous_over_softmax"] > 0 and result["engine"]["deepspeed"]["step_ms"] > 0
    cfg = load_config(None, [*TINY[8:], *bench_train.INPUT_EMBEDDINGS["targets"], *bench_train.HEADS["continuous"]])
    model = bench_train.TimedModel(cfg, 400, bench_train.torch.device("cpu"), 2, 8, "fused").model
    assert not [n for n, p in model.named_parameters() if 400 in p.shape]
    with pytest.raises(ValueError, match="--input-embedding targets has no learned V x d_model table .* --optimizer fused"):
        _run(["--vocab-sizes", "50", "--input-embedding", "targets"])
