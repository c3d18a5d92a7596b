"""MLflow for real: a tracking server over HTTP, one that is down and comes back, the UI in Chromium."""
from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
from mlflow import MlflowClient
from ops_services import REPO, free_port, render_dom, start_mlflow_server, stop_group, wait_http

from pretrain.cli import main as cli_main
from pretrain.config import load_config
from pretrain.tracking import Tracker, start_tracking

pytestmark = pytest.mark.system


def _history(client, run_id, key="loss"):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_metrics_params_and_artifacts_arrive_on_a_server(mlflow_server, tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"workdir={tmp_path}", f"train.run_dir={run_dir}", f"tracking.tracking_uri={mlflow_server}",
                             "tracking.experiment=server-test"])  # workdir: no stray data/targets artifacts
    tracker = start_tracking(cfg, run_dir, rank=0, world_size=2)
    for step in range(3):
        tracker.log_metrics({"loss": 3.0 - step, "tokens_per_s": 100.0 * step}, step)
    report = tmp_path / "report.json"
    report.write_text('{"top1": 0.5}')
    tracker.log_artifact(report, artifact_path="eval")
    tracker.close()
    resumed = start_tracking(cfg, run_dir, rank=0, world_size=2)
    resumed.log_metrics({"loss": 0.5}, 3)
    resumed.close()

    client = MlflowClient(mlflow_server)
    run = client.get_run(tracker.run_id)
    assert resumed.run_id == tracker.run_id
    assert _history(client, run.info.run_id) == [(0, 3.0), (1, 2.0), (2, 1.0), (3, 0.5)]
    assert _history(client, run.info.run_id, "tokens_per_s")[-1] == (2, 200.0)
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.tags["system.world_size"] == "2"
    assert run.info.status == "FINISHED"
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["config.resolved.yaml", "eval"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "eval")] == ["eval/report.json"]
    assert not (run_dir / "mlflow_pending.jsonl").exists()


def test_server_down_then_back_receives_the_backlog(tmp_path):
    """Training starts while the server is down; it keeps records, then sends them once the server is up."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    live = Tracker(tmp_path / "live", tracking_uri=uri, run_name="live", retry_seconds=0.5, http_timeout_s=2)
    closed = Tracker(tmp_path / "closed", tracking_uri=uri, run_name="closed", retry_seconds=0.5, http_timeout_s=2)
    for step in range(3):
        live.log_metrics({"loss": float(step)}, step)
        closed.log_metrics({"loss": 10.0 + step}, step)
    closed.close()  # the server never answered during this run: everything stays kept
    assert live.run_id is None and (tmp_path / "live" / "mlflow_pending.jsonl").is_file()

    proc, _ = start_mlflow_server(tmp_path / "server", port)
    try:
        time.sleep(0.6)  # past the retry interval: the next record reconnects and sends the backlog
        live.log_metrics({"loss": 3.0}, 3)
        live.close()
        assert not (tmp_path / "live" / "mlflow_pending.jsonl").exists()
        assert cli_main(["ui", str(tmp_path / "closed"), "--sync"]) == 0
        assert not (tmp_path / "closed" / "mlflow_pending.jsonl").exists()

        client = MlflowClient(uri)
        assert _history(client, live.run_id) == [(s, float(s)) for s in range(4)]
        assert client.get_run(live.run_id).info.status == "FINISHED"
        closed_run = client.search_runs([client.get_experiment_by_name("softmax-free-pretraining").experiment_id],
                                        filter_string="attributes.run_name = 'closed'")
        assert len(closed_run) == 1 and closed_run[0].info.status == "FINISHED"
        assert _history(client, closed_run[0].info.run_id) == [(s, 10.0 + s) for s in range(3)]
    finally:
        stop_group(proc)


def test_pretrain_ui_shows_the_run_in_headless_chromium(tmp_path):
    run_name = f"ui-check-{uuid.uuid4().hex[:8]}"
    tracker = Tracker(tmp_path / "run", run_name=run_name)
    tracker.log_metrics({"loss": 1.0}, 0)
    tracker.close()
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "pretrain", "ui", str(tmp_path), "--port", str(port)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = ui.stdout.readline()  # "<run_dir>: http://127.0.0.1:PORT/#/experiments/ID/runs"
        assert f"http://127.0.0.1:{port}/#/experiments/" in line, line
        url = line.split(": ", 1)[1].strip()
        wait_http(f"http://127.0.0.1:{port}/health", 30, ui)
        dom = render_dom(url, tmp_path / "chromium-profile")
        assert run_name in dom, f"{run_name} not in the rendered runs table ({len(dom)} bytes of DOM)"
    finally:
        stop_group(ui)
