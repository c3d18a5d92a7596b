"""`pretrain eval` on the tiny trained checkpoints (tiny_runs: 2 processes, ZeRO-2/3, softmax, causal,
pipeline): the report matches a direct brute-force computation over the same validation data."""
import json

import pytest
import torch
import torch.nn.functional as F

from pretrain.cli import main
from pretrain.data.stream import build_loader
from pretrain.evaluation.evaluate import corrupt_per_sequence
from pretrain.evaluation.subject import from_run
from pretrain.model import IGNORE_INDEX

RUNS = ["zero2", "zero3", "softmax", "zero1", "pipeline", "learned", "table_input_softmax", "table_input_learned"]
EVAL_OVERRIDES = ["eval.max_batches=0", "eval.batch_size=64", "eval.samples_to_show=2", "tracking.enabled=false"]


def run_eval(tiny_runs, name: str, out, *extra: str) -> dict:
    run = tiny_runs[name]
    rc = main(["eval", str(run.run_dir / "config.resolved.yaml"), *EVAL_OVERRIDES, *extra, "--run-dir", str(run.run_dir), "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def trained_run(tiny_runs, tmp_path_factory):
    """The tiny_runs model trained for 150 steps (one process, ZeRO-0: ~12 s of training): tiny_runs'
    own 16-step checkpoints sit near chance, this one learns (measured top-1 0.055, chance 0.001)."""
    import subprocess
    import sys
    import types

    from pretrain.config import load_config

    base = next(iter(tiny_runs.values())).run_dir.parent / "base.yaml"
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    overrides = ["train.steps=150", "train.checkpoint_every=150", "train.warmup_steps=10", "train.micro_batch_size=16",
                 "train.zero_stage=0", f"train.run_dir={run_dir}", "train.run_name=trained"]
    subprocess.run([sys.executable, "-m", "pretrain", "train", str(base), *overrides], check=True, timeout=600, capture_output=True)
    return types.SimpleNamespace(run_dir=run_dir, cfg=load_config(run_dir / "config.resolved.yaml"))


@pytest.fixture(scope="module")
def reports(tiny_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_reports")
    return {name: run_eval(tiny_runs, name, out / name / "report.json") for name in RUNS}


@torch.no_grad()
def direct(run_dir, seed=0) -> dict:
    """Top-1/5 recomputed without FAISS: predict() everywhere, then a plain matmul (or the logits)."""
    subject = from_run(run_dir)
    model = subject.model
    loader = build_loader(subject.data_dir, "valid", batch_size=64, rank=0, world_size=1, num_workers=0,
                          seed=subject.cfg.data.seed, epochs=1)
    hits1 = hits5 = tokens = 0
    for raw in loader:
        batch = corrupt_per_sequence(model.objective, raw, seed)
        outputs = model.predict(batch["input_ids"], batch["doc_ids"])
        chosen = batch["labels"] != IGNORE_INDEX
        pred, target = outputs[chosen].float(), batch["labels"][chosen]
        scores = F.normalize(pred, dim=-1) @ model.target_table.T if model.continuous else pred
        top5 = scores.topk(5, dim=-1).indices
        hits1 += int((top5[:, 0] == target).sum())
        hits5 += int((top5 == target[:, None]).any(dim=1).sum())
        tokens += len(target)
    return {"tokens": tokens, "top1": hits1 / tokens, "top5": hits5 / tokens, "vocab_size": subject.tokenizer.get_piece_size()}


@pytest.mark.parametrize("name", RUNS)
def test_report_matches_direct_computation(reports, tiny_runs, name):
    report, want = reports[name], direct(tiny_runs[name].run_dir)
    assert report["tokens"] == want["tokens"]
    # FAISS (float32) and a torch matmul may order exact ties differently: one token's worth of slack.
    slack = 1.0 / want["tokens"] + 1e-12
    assert abs(report["top1"] - want["top1"]) <= slack and abs(report["top5"] - want["top5"]) <= slack
    assert report["chance_top1"] == pytest.approx(1 / want["vocab_size"])
    assert report["checkpoint"]["step"] == 16 and report["checkpoint"]["tag"] == "step-00000016"


def test_trained_checkpoint_is_well_above_chance(trained_run, tmp_path):
    report = run_eval({"trained": trained_run}, "trained", tmp_path / "report.json")
    want = direct(trained_run.run_dir)
    slack = 1.0 / want["tokens"] + 1e-12
    assert report["tokens"] == want["tokens"] and abs(report["top1"] - want["top1"]) <= slack
    assert abs(report["top5"] - want["top5"]) <= slack
    assert report["top1"] > 20 * report["chance_top1"] and report["top5"] > report["top1"]
    assert report["checkpoint"]["step"] == 150


def test_report_contents_per_head(reports):
    cont, soft = reports["zero2"], reports["softmax"]
    assert cont["head"] == "continuous" and cont["decoding"] == "nearest-neighbour"
    assert cont["decode"]["index"] == "flat" and cont["decode"]["placement"] == "cpu" and cont["decode"]["vectors_per_s"] > 0
    assert -1 <= cont["mean_cosine"] <= 1 and cont["loss_name"] == "vmf_practice"
    assert soft["decoding"] == "argmax" and soft["perplexity"] > 1 and soft["loss_name"] == "cross_entropy"
    assert soft["perplexity"] == pytest.approx(torch.tensor(soft["loss"]).exp().item(), rel=1e-6)
    # Masked runs, same eval.seed: both heads were scored on the same positions.
    assert cont["tokens"] == soft["tokens"] == reports["zero3"]["tokens"]
    assert [s["target"] for s in cont["samples"]] == [s["target"] for s in soft["samples"]]
    assert len(cont["samples"]) == 2 and "[MASK]" in cont["samples"][0]["input"]
    # ZeRO-2 and ZeRO-3 train identically (to float rounding): their consolidated checkpoints score alike.
    assert reports["zero3"]["top5"] == cont["top5"] and reports["zero3"]["mean_cosine"] == pytest.approx(cont["mean_cosine"], abs=1e-6)
    assert reports["zero1"]["objective"] == "causal" and reports["zero1"]["tokens"] > cont["tokens"]


def test_approximate_index_recall_and_mlflow(tiny_runs, tmp_path):
    import mlflow

    out = tmp_path / "eval" / "report.json"
    report = run_eval(tiny_runs, "zero2", out, "eval.index=ivf", "eval.ivf_nlist=8", "eval.ivf_nprobe=8",
                      "tracking.enabled=true", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    recall = report["decode"]["recall_against_exact"]
    assert report["decode"]["index"] == "ivf" and recall["recall@1"] == recall["recall@5"] == 1.0  # all lists probed
    assert (out.parent / "samples.txt").read_text().count("--- sample") == 2
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.metrics["eval/top1"] == pytest.approx(report["top1"])
    assert client.get_metric_history(run.info.run_id, "eval/top1")[0].step == 16
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval")} >= {"eval/report.json", "eval/samples.txt"}


def test_clear_errors(tiny_runs, tmp_path, capsys):
    run = tiny_runs["zero2"]
    assert main(["eval", "--run-dir", str(tmp_path / "nothing")]) == 1
    assert "no such run or checkpoint directory" in capsys.readouterr().err
    assert main(["eval", str(run.run_dir / "config.resolved.yaml"), "--run-dir", str(run.run_dir), "--tag", "step-00000099"]) == 1
    assert "step-00000099" in capsys.readouterr().err
    assert main(["eval", str(run.run_dir / "config.resolved.yaml"), "eval.device=sharded", "--run-dir", str(run.run_dir)]) == 1
    assert "faiss-gpu" in capsys.readouterr().err
    assert main(["eval", "--export", str(tmp_path / "export"), "--tag", "step-00000008"]) == 1  # not silently ignored
    assert "--tag picks a checkpoint of a training run" in capsys.readouterr().err
    other_data = tmp_path / "other_data"
    other_data.mkdir()
    manifest = json.loads((run.cfg.data_dir / "manifest.json").read_text())
    (other_data / "manifest.json").write_text(json.dumps({**manifest, "tokenizer_sha256": "0" * 64}))
    assert main(["eval", str(run.run_dir / "config.resolved.yaml"), "--run-dir", str(run.run_dir), "--data-dir", str(other_data)]) == 1
    err = capsys.readouterr().err
    assert f"validation data {other_data} was tokenised with tokenizer sha256 000000000000" in err and "--data-dir" in err


def test_export_scores_like_its_run(tiny_runs, reports, tmp_path):
    from pretrain.downstream.export import export_run

    run = tiny_runs["zero2"]
    export_dir = export_run(run.run_dir, tmp_path / "export")
    rc = main(["eval", str(run.run_dir / "config.resolved.yaml"), *EVAL_OVERRIDES, "--export", str(export_dir)])
    assert rc == 0
    report = json.loads((export_dir / "eval" / "report.json").read_text())
    assert report["checkpoint"]["export_dir"] == str(export_dir) and report["checkpoint"]["step"] == 16
    for key in ("tokens", "top1", "top5", "majority_top1"):
        assert report[key] == reports["zero2"][key]
    assert report["mean_cosine"] == pytest.approx(reports["zero2"]["mean_cosine"], abs=1e-6)


@pytest.mark.multiproc
def test_two_processes_report_the_single_process_numbers(tiny_runs, reports, tmp_path):
    """torchrun, 2 ranks: each scores its shards, one all-reduce at the end; masks do not depend on the split."""
    import subprocess
    import sys

    run = tiny_runs["softmax"]
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pretrain", "eval",
           str(run.run_dir / "config.resolved.yaml"), *EVAL_OVERRIDES, "--run-dir", str(run.run_dir), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    for key in ("tokens", "sequences", "top1", "top5", "majority_top1"):
        assert report[key] == reports["softmax"][key]
    assert report["perplexity"] == pytest.approx(reports["softmax"]["perplexity"], rel=1e-9)


def test_eval_adds_to_the_training_runs_tracking_server(tiny_runs, tmp_path, monkeypatch):
    """A run tracked on a server: eval's metrics go to that MLflow run (kept for later while the server is
    down), not to a new local store that would take over the run's mlflow_run.json."""
    import shutil
    import socket

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # restored after the test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        server = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there once closed
    run_dir = shutil.copytree(tiny_runs["zero2"].run_dir, tmp_path / "run")
    record = {"tracking_uri": server, "experiment": "softmax-free-pretraining", "experiment_id": "7", "run_id": "r123"}
    (run_dir / "mlflow_run.json").write_text(json.dumps(record))
    rc = main(["eval", str(run_dir / "config.resolved.yaml"), *EVAL_OVERRIDES, "tracking.enabled=true",
               "tracking.http_timeout_s=1", "--run-dir", str(run_dir)])
    assert rc == 0
    assert json.loads((run_dir / "mlflow_run.json").read_text()) == record
    assert not (run_dir / "mlflow.db").exists()
    pending = [json.loads(line) for line in (run_dir / "mlflow_pending.jsonl").read_text().splitlines()]
    top1 = [r["metrics"]["eval/top1"] for r in pending if r["op"] == "metrics" and "eval/top1" in r["metrics"]]
    assert top1 == [json.loads((run_dir / "eval" / "report.json").read_text())["top1"]]


def test_another_data_set_is_reported_and_tracked_under_its_own_name(tiny_runs, tiny_data, tmp_path):
    """Before, `--data-dir OTHER` replaced the run's eval/report.json and its eval/top1 in MLflow."""
    import shutil

    import mlflow

    from pretrain.data.manifest import manifest_sha256

    run_dir = shutil.copytree(tiny_runs["zero2"].run_dir, tmp_path / "run")
    other = shutil.copytree(tiny_data.data_dir, tmp_path / "other_domain")
    common = ["eval", str(run_dir / "config.resolved.yaml"), *EVAL_OVERRIDES, "eval.max_batches=1", "tracking.enabled=true",
              f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "--run-dir", str(run_dir)]
    assert main(common) == 0
    own = json.loads((run_dir / "eval" / "report.json").read_text())
    assert main([*common, "--data-dir", str(other)]) == 0
    key = f"other_domain-{manifest_sha256(other)[:8]}"
    theirs = json.loads((run_dir / "eval" / key / "report.json").read_text())
    assert json.loads((run_dir / "eval" / "report.json").read_text()) == own  # untouched
    assert own["dataset"] == "training data" and theirs["dataset"] == key and theirs["data_dir"] == str(other)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "eval/top1")] == [pytest.approx(own["top1"])]
    assert [m.value for m in client.get_metric_history(run.info.run_id, f"eval/{key}/top1")] == [pytest.approx(theirs["top1"])]
    assert {a.path for a in client.list_artifacts(run.info.run_id, f"eval/{key}")} >= {f"eval/{key}/report.json"}
