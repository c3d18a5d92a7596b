"""`pretrain bench all`: the dispatcher's wiring with stand-in suites (each real suite has its own test)."""
import argparse
import json
import types

import faiss
import pytest
import torch
from mlflow import MlflowClient

from pretrain.bench import decode, loss, train
from pretrain.cli import main
from pretrain.commands import bench as bench_cmd
from pretrain.config import load_config


def test_the_real_suites_are_found_in_order_and_report_is_not_one():
    assert list(bench_cmd._suites()) == ["data", "loss", "train", "decode"]


@pytest.mark.parametrize("cuda", [False, True])
def test_all_arguments_parse_with_the_real_suites(cuda):
    argv = bench_cmd.all_suite_args(cuda)
    parsed = {}
    for name, module in {"loss": loss, "train": train, "decode": decode}.items():
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        parsed[name] = parser.parse_args(argv[name])
    # The vocabulary sizes for loss and decode; several V for training; the report draws the plots.
    assert parsed["loss"].vocab_sizes == parsed["decode"].vocab_sizes == [32768, 131072, 262144]
    assert {"cosine", "vmf_practice", "margin"} <= set(parsed["loss"].losses)
    assert parsed["loss"].plot == parsed["decode"].plot == ""
    assert len(parsed["train"].vocab_sizes.split(",")) >= 3 and parsed["train"].engine
    # Shapes that mean something (the continuous side is not per-call overhead), both target widths, 5 repeats.
    assert parsed["loss"].tokens >= 1024 and parsed["loss"].hidden >= 256 and {64, 512} <= set(parsed["loss"].dims)
    assert parsed["loss"].repeats >= 5 and parsed["train"].repeats >= 5 and parsed["decode"].repeats >= 5
    assert parsed["loss"].threads == parsed["train"].threads == parsed["decode"].threads == (0 if cuda else 1)
    if cuda:  # the GPU shape: N = 16 x 512 = 8192 tokens through the base encoder, up to V=256k
        cfg = load_config(parsed["train"].config, parsed["train"].overrides)
        assert (cfg.model.d_model, cfg.targets.dim, parsed["train"].batch_size * parsed["train"].seq_len) == (1024, 512, 8192)
        assert parsed["train"].vocab_sizes.endswith("262144")


@pytest.fixture
def fake_suites(monkeypatch, synthetic_results):
    """Stand-in suites returning the synthetic results; they record the arguments they were given."""
    calls = {}

    def suite(name):
        def add_arguments(parser):
            parser.add_argument("--size", type=int, default=0)

        def run(args):
            calls[name] = args.size
            if name == "loss":
                torch.set_num_threads(1)  # as `bench loss --threads 1` does
            if name == "train":
                faiss.omp_set_num_threads(1)  # as `bench decode --threads 1` does
            if name == "decode":
                raise RuntimeError("faiss exploded")
            return synthetic_results["suites"][name]
        return types.SimpleNamespace(HELP=name, add_arguments=add_arguments, run=run)

    names = ["data", "loss", "train", "decode"]
    monkeypatch.setattr(bench_cmd, "_suites", lambda: {n: suite(n) for n in names})
    monkeypatch.setattr(bench_cmd, "all_suite_args", lambda cuda, threads: {n: ["--size", str(i)] for i, n in enumerate(names)})
    return calls


def test_all_runs_every_suite_writes_json_table_plots_and_tracks_them(tmp_path, fake_suites, capsys):
    out, store = tmp_path / "bench" / "results.json", tmp_path / "bench" / "mlruns"
    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    argv = ["bench", "all", "--out", str(out), "--track", "--store-dir", str(store)]
    assert main(argv) == 1  # decode failed: reported, the others still written
    assert fake_suites == {"data": 0, "loss": 1, "train": 2, "decode": 3}
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == threads  # what a suite pinned is undone

    results = json.loads(out.read_text())
    assert results["suites"]["decode"]["error"] == "RuntimeError: faiss exploded"
    assert results["suites"]["loss"]["results"]["4096"]["cosine D8"]["ms"] == 2.0
    assert results["suite_args"]["train"] == ["--size", "2"]
    assert {"cpu", "cores", "torch", "date", "load_average"} <= set(results["hardware"])
    assert results["seconds"] >= 0 and len(results["load_average_end"]) == 3
    pngs = {"loss_time_vs_vocab.png", "loss_memory_vs_vocab.png", "train_tokens_per_s_vs_vocab.png"}
    assert pngs <= {p.name for p in out.parent.iterdir()}
    assert "`pretrain bench decode` failed" in (out.parent / "results.md").read_text()
    assert "failed suites: decode" in capsys.readouterr().out

    # Tracking: one new run per call, metrics and params from the JSON, files as artifacts.
    assert main(argv) == 1
    client = MlflowClient(f"sqlite:///{store.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("pretrain-bench")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    run = runs[0]
    assert run.data.metrics["loss.results.4096.cosine D8.ms"] == 2.0
    assert run.data.metrics["train.results.16000.continuous.tokens_per_s"] == 280.0
    assert run.data.params["hardware.cores"] == str(results["hardware"]["cores"])
    assert run.data.params["args.loss"] == "--size 1"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "bench")}
    assert {f"bench/{n}" for n in ["results.json", "results.md", *pngs]} <= artifacts
    assert (store / "mlartifacts").is_dir()  # artifacts next to the store, not inside a run record


def test_all_rejects_an_unknown_suite(fake_suites, tmp_path, capsys):
    assert main(["bench", "all", "--suites", "loss", "nope", "--out", str(tmp_path / "r.json")]) == 1
    assert "--suites: unknown ['nope']" in capsys.readouterr().err
    assert fake_suites == {}


def test_all_runs_only_the_chosen_suites(fake_suites, tmp_path):
    assert main(["bench", "all", "--suites", "train", "--out", str(tmp_path / "r.json")]) == 0
    assert fake_suites == {"train": 2}
    assert list(json.loads((tmp_path / "r.json").read_text())["suites"]) == ["train"]


@pytest.mark.parametrize("argv, message", [
    (["decode", "--vocab-sizes", "3", "--plot", ""], "--vocab-sizes 3 is smaller than --k 5"),
    (["decode", "--queries", "0", "--plot", ""], "--k, --queries and --dim must be at least 1"),
    (["decode", "--repeats", "2", "--vocab-sizes", "64", "--plot", ""], "--repeats 2: a median with [min, max] needs at least 5"),
    (["train", "--vocab-sizes", "4k"], "--vocab-sizes '4k': give comma-separated integers"),
    (["loss", "--tokens", "0", "--plot", ""], "--tokens, --hidden and --chunk-size must be positive"),
    (["train", "--repeats", "1"], "--repeats 1: a median with [min, max] needs at least 5"),
])
def test_suites_refuse_bad_arguments_in_one_line(argv, message, capsys):
    # Checked before any work: decode's top-k used to die in a torch traceback, train's in int().
    assert main(["bench", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
