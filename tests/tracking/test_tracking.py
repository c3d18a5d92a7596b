"""The MLflow tracker against a real local SQLite store (no server): fast, not `system`.

Everything a server adds (metrics arriving over HTTP, the UI) is in tests/system/test_mlflow_system.py.
"""
from __future__ import annotations

import json
import logging
import socket

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pretrain.cli import main as cli_main
from pretrain.config import load_config
from pretrain.tracking import NullTracker, Tracker, start_tracking, tracker as tracker_mod


def _cfg(run_dir, *overrides):
    return load_config(None, [f"train.run_dir={run_dir}", f"workdir={run_dir.parent}", *overrides])


def _only_run(run_dir):
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("softmax-free-pretraining").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def _history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One run: start, three logged steps of mixed metric types, close; then resumed for two more."""
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    cfg = _cfg(run_dir)
    # What earlier stages leave in the workdir (their content does not matter here).
    cfg.data_dir.mkdir(parents=True)
    (cfg.data_dir / "tokenizer.model").write_bytes(b"sentencepiece")
    cfg.targets_path.parent.mkdir(parents=True)
    (cfg.targets_path.parent / "report.json").write_text('{"effective_rank": 3.0}')
    first = start_tracking(cfg, run_dir, rank=0, world_size=4)
    for step in range(3):
        first.log_metrics({"loss": 1.0 / (step + 1), "lr": np.float32(0.5), "grad_norm": torch.tensor(2.0),
                           "bad key(%)": 7, "note": "not a number", "overflow": True}, step)
    first.close()
    client, run = _only_run(run_dir)
    status_after_first = run.info.status
    # As `pretrain eval` does afterwards: one process, a changed setting.
    resumed = start_tracking(_cfg(run_dir, "train.steps=999"), run_dir, rank=0, world_size=1)
    status_while_resumed = client.get_run(resumed.run_id).info.status
    resumed.log_metrics({"loss": 0.1}, 3)
    resumed.log_metrics({"loss": 0.05}, 4)
    resumed.close()
    return {"run_dir": run_dir, "cfg": cfg, "first": first, "resumed": resumed,
            "status_after_first": status_after_first, "status_while_resumed": status_while_resumed}


def test_other_ranks_and_disabled_tracking_do_nothing(tmp_path):
    for rank, overrides in ((1, []), (3, []), (0, ["tracking.enabled=false"])):
        tracker = start_tracking(_cfg(tmp_path / "run", *overrides), tmp_path / "run", rank=rank)
        assert isinstance(tracker, NullTracker) and not tracker.enabled
        tracker.log_params({"a": 1})
        tracker.log_metrics({"loss": 1.0}, 0)
        tracker.log_artifact(tmp_path)
        tracker.close()
    assert not (tmp_path / "run").exists()


def test_params_system_info_and_config_artifact(finished_run):
    client, run = _only_run(finished_run["run_dir"])
    cfg = finished_run["cfg"]
    params = run.data.params
    assert params["train.lr"] == str(cfg.train.lr)
    assert params["loss.name"] == cfg.loss.name
    assert params["tracking.tracking_uri"] == "None"
    assert params["train.betas"] == str(list(cfg.train.betas))
    tags = run.data.tags
    assert tags["system.world_size"] == "4"
    assert tags["system.torch"] == torch.__version__
    assert tags["mlflow.runName"] == "run"  # the run directory's name
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["config.resolved.yaml", "data", "targets"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "data")] == ["data/tokenizer.model"]  # no manifest yet
    assert [a.path for a in client.list_artifacts(run.info.run_id, "targets")] == ["targets/report.json"]
    local = client.download_artifacts(run.info.run_id, "config.resolved.yaml")
    assert load_config(local).to_dict() == cfg.to_dict()


def test_metrics_per_step_with_numpy_torch_and_bad_keys(finished_run):
    client, run = _only_run(finished_run["run_dir"])
    rid = run.info.run_id
    assert _history(client, rid, "lr") == [(0, 0.5), (1, 0.5), (2, 0.5)]
    assert _history(client, rid, "grad_norm") == [(0, 2.0), (1, 2.0), (2, 2.0)]
    assert _history(client, rid, "bad key___") == [(s, 7.0) for s in range(3)]
    assert _history(client, rid, "overflow") == [(s, 1.0) for s in range(3)]
    assert "note" not in run.data.metrics


def test_resume_continues_the_same_run(finished_run):
    client, run = _only_run(finished_run["run_dir"])
    assert finished_run["resumed"].run_id == finished_run["first"].run_id == run.info.run_id
    assert finished_run["resumed"].resumed and not finished_run["first"].resumed
    assert finished_run["status_after_first"] == "FINISHED"
    assert finished_run["status_while_resumed"] == "RUNNING"
    assert run.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "loss") == [(0, 1.0), (1, 0.5), (2, 1 / 3), (3, 0.1), (4, 0.05)]
    # MLflow params are write-once: the first value stays, the changed one is kept as a tag.
    assert run.data.params["train.steps"] == str(finished_run["cfg"].train.steps)
    assert run.data.tags["resume_changed.train.steps"] == "999"
    assert run.data.tags["system.world_size"] == "4"  # the system tags of the run's start stay


def test_unreadable_run_record_starts_a_new_run(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "mlflow_run.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking.tracker"):
        tracker = Tracker(run_dir)
    assert "mlflow_run.json" in caplog.text and "new MLflow run" in caplog.text
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == tracker.run_id
    tracker.close()


def test_unreachable_server_warns_once_and_keeps_records(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    run_dir = tmp_path / "run"
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg = _cfg(run_dir, f"tracking.tracking_uri={uri}", "tracking.retry_seconds=0.001", "tracking.http_timeout_s=1")
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking.tracker"):
        tracker = start_tracking(cfg, run_dir, rank=0)
        for step in range(4):
            tracker.log_metrics({"loss": float(step)}, step)
        tracker.close()
    unreachable = [r for r in caplog.records if "is unreachable" in r.getMessage()]
    assert len(unreachable) == 1 and str(run_dir / "mlflow_pending.jsonl") in unreachable[0].getMessage()
    assert "still unreachable" in caplog.text and "--sync" in caplog.text
    records = [json.loads(line) for line in (run_dir / "mlflow_pending.jsonl").read_text().splitlines()]
    assert [r["op"] for r in records] == ["params", "tags", "artifact", "metrics", "metrics", "metrics", "metrics", "status"]
    assert [r["metrics"]["loss"] for r in records if r["op"] == "metrics"] == [0.0, 1.0, 2.0, 3.0]
    assert records[0]["params"]["train.lr"] == str(cfg.train.lr)
    assert json.loads((run_dir / "mlflow_run.json").read_text())["tracking_uri"] == uri
    # MLflow's own retries (7, exponential backoff) would stall training for minutes.
    assert tracker_mod.os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert tracker_mod.os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "1"


def test_backlog_is_sent_in_order_when_the_store_answers_again(tmp_path, monkeypatch):
    """The replay logic, with reachability switched by hand (a real server: tests/system)."""
    reachable = {"now": False}
    monkeypatch.setattr(tracker_mod, "server_reachable", lambda uri, timeout: reachable["now"])
    clock = {"now": 0.0}
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, retry_seconds=10, clock=lambda: clock["now"])
    assert tracker.run_id is None
    tracker.log_params({"train": {"lr": 0.1}})
    for step in range(3):
        tracker.log_metrics({"loss": float(step)}, step)
    assert len((run_dir / "mlflow_pending.jsonl").read_text().splitlines()) == 4
    reachable["now"] = True
    tracker.log_metrics({"loss": 3.0}, 3)  # retry interval not over yet: still kept
    assert len((run_dir / "mlflow_pending.jsonl").read_text().splitlines()) == 5
    clock["now"] = 11.0
    tracker.log_metrics({"loss": 4.0}, 4)
    assert not (run_dir / "mlflow_pending.jsonl").exists()
    tracker.close()
    client, run = _only_run(run_dir)
    assert _history(client, run.info.run_id, "loss") == [(s, float(s)) for s in range(5)]
    assert run.data.params == {"train.lr": "0.1"}
    assert run.info.status == "FINISHED"


def test_ui_without_a_store_is_a_clean_error(tmp_path, capsys):
    assert cli_main(["ui", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no local MLflow store (mlflow.db)" in err and str(tmp_path) in err
    assert cli_main(["ui", str(tmp_path / "missing")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert cli_main(["ui", str(tmp_path), "--port", "99999"]) == 1
    assert "--port 99999 is not a TCP port (1-65535)" in capsys.readouterr().err


def test_records_larger_than_one_mlflow_request_are_sent_whole(tmp_path):
    """MLflow takes at most 1000 metrics / 100 params or tags per request: bigger records are split."""
    run_dir = tmp_path / "big"
    tracker = Tracker(run_dir)
    sizes = []  # (kind, entities) per request; a local store takes any size, a server does not
    send = tracker._client.log_batch

    def spy(run_id, **batch):
        sizes.extend((kind, len(items)) for kind, items in batch.items() if items)
        return send(run_id, **batch)

    tracker._client.log_batch = spy
    tracker.log_params({f"p{i:03d}": i for i in range(250)})
    tracker.set_tags({f"t{i:03d}": i for i in range(130)})
    tracker.log_metrics({f"m{i:04d}": float(i) for i in range(2500)}, step=1)
    tracker.close()
    _, run = _only_run(run_dir)
    assert len(run.data.params) == 250 and run.data.params["p249"] == "249"
    assert {k for k in run.data.tags if k.startswith("t")} == {f"t{i:03d}" for i in range(130)}
    assert len(run.data.metrics) == 2500 and run.data.metrics["m2499"] == 2499.0
    assert not (run_dir / tracker_mod.PENDING).exists()
    assert [n for kind, n in sizes if kind == "metrics"] == [1000, 1000, 500]
    assert [n for kind, n in sizes if kind == "params"] == [100, 100, 50]
    assert [n for kind, n in sizes if kind == "tags"] == [100, 30]


def test_a_hung_server_costs_one_timeout_per_record_not_two(tmp_path, monkeypatch, caplog):
    """A server that accepts connections and never answers: the record's request times out once and
    the tracker goes offline at once (before, a health check waited a second http_timeout_s)."""
    import threading

    from mlflow import MlflowClient

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held = []  # connections accepted and never answered

    def accept_forever():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    tracker = Tracker(tmp_path / "run", http_timeout_s=1)  # online on a local store, then the server "hangs":
    tracker.tracking_uri, tracker._client = uri, MlflowClient(tracking_uri=uri)
    try:
        with caplog.at_level(logging.WARNING, logger="pretrain.tracking.tracker"):
            tracker.log_metrics({"loss": 1.0}, 1)
    finally:
        listener.close()
        for conn in held:
            conn.close()
    assert len(held) == 1  # the request only: no health check after it
    assert "is unreachable" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "run" / "mlflow_pending.jsonl").read_text().splitlines()]
    assert [r["metrics"] for r in records] == [{"loss": 1.0}]


def test_sync_with_the_server_still_down_does_not_talk_of_training(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, tracking_uri=f"http://127.0.0.1:{_closed_port()}", http_timeout_s=1)
    tracker.log_metrics({"loss": 1.0}, 1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking.tracker"):
        assert cli_main(["ui", str(run_dir), "--sync"]) == 1  # records left
    assert "Training continues" not in caplog.text and "goes on" not in caplog.text
    assert f"the records stay in {run_dir / 'mlflow_pending.jsonl'}; rerun `pretrain ui {run_dir} --sync`" in caplog.text
