"""`pretrain ui [PATH]`: open the MLflow UI on the runs' local stores (127.0.0.1 only)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pretrain.tracking.tracker import LOCAL_ARTIFACTS, LOCAL_STORE, PENDING, RUN_RECORD, is_remote, local_store_uri, sync_pending

HELP = "MLflow UI on the runs' local tracking stores (or --sync a run's records to its server)"
DESCRIPTION = """Start `mlflow ui` on 127.0.0.1 for every run directory under PATH that has a local
store (<run_dir>/mlflow.db), one port each, and print their addresses; Ctrl-C stops them.

PATH is a run directory or any directory above several (default: runs). A run tracked on a server
(tracking.tracking_uri) is listed with that server's address instead.

The same by hand, for one run:
  mlflow ui --backend-store-uri sqlite:///ABS/RUN_DIR/mlflow.db --host 127.0.0.1 --port 5000

--sync sends the records a run kept while its tracking server was unreachable
(<run_dir>/mlflow_pending.jsonl) and exits."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", default="runs", help="a run directory, or a directory above several (default: runs)")
    parser.add_argument("--port", type=int, default=5000, help="first port to try; each further store takes the next free one")
    parser.add_argument("--sync", action="store_true", help="send kept records to the tracking server, then exit")
    parser.add_argument("--tracking-uri", default=None, help="with --sync: the server to send to (default: the one the run used)")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for each UI server to answer")


def _run_dirs(root: Path, marker: str) -> list[Path]:
    """Run directories at or below root holding `marker`, skipping artifact copies."""
    if (root / marker).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(marker) if LOCAL_ARTIFACTS not in p.parts)


def _free_port(start: int) -> int:
    for port in range(start, min(start + 200, 65536)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ValueError(f"no free port in {start}..{start + 199}: pass --port")


def _experiment_path(run_dir: Path) -> str:
    record = json.loads((run_dir / RUN_RECORD).read_text()) if (run_dir / RUN_RECORD).is_file() else {}
    return f"#/experiments/{record['experiment_id']}/runs" if record.get("experiment_id") else ""


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ValueError(f"mlflow ui exited with status {proc.returncode} before answering on {url}; its output is above")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise ValueError(f"mlflow ui did not answer on {url} within {timeout:.0f} s: raise --timeout")


def _sync(root: Path, tracking_uri: str | None) -> int:
    run_dirs = _run_dirs(root, PENDING)
    if not run_dirs:
        print(f"nothing to send: no {PENDING} under {root}")
        return 0
    left_total = 0
    for run_dir in run_dirs:
        sent, left = sync_pending(run_dir, tracking_uri)
        left_total += left
        print(f"{run_dir}: sent {sent} records" + (f", {left} still kept (server unreachable?)" if left else ""))
    return 1 if left_total else 0


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (1-65535)")
    root = Path(args.path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: pass a run directory (train.run_dir) or the runs folder above it")
    if args.sync:
        return _sync(root, args.tracking_uri)
    for run_dir in _run_dirs(root, RUN_RECORD):
        uri = json.loads((run_dir / RUN_RECORD).read_text()).get("tracking_uri", "")
        if is_remote(uri):
            print(f"{run_dir}: tracked on {uri}  (open it there)")
    stores = _run_dirs(root, LOCAL_STORE)
    if not stores:
        raise FileNotFoundError(
            f"no local MLflow store ({LOCAL_STORE}) under {root}: train with tracking.enabled=true and no "
            "tracking.tracking_uri, or pass the run directory"
        )
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # `kill` should stop the UI servers too, as Ctrl-C does: SystemExit runs the `finally` below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    servers: list[subprocess.Popen] = []
    port = args.port
    try:
        urls = []
        for run_dir in stores:  # all start at once; each takes seconds to come up
            port = _free_port(port)
            urls.append(f"http://127.0.0.1:{port}")
            cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", local_store_uri(run_dir),
                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
            # Own process group: `mlflow ui` runs uvicorn as a child, which must go with it.
            # Its chatter goes to stderr: stdout carries only the addresses (scriptable).
            servers.append(subprocess.Popen(cmd, env=env, start_new_session=True, stdout=sys.stderr))
            port += 1
        for run_dir, url, proc in zip(stores, urls, servers):
            _wait_healthy(url, proc, args.timeout)
            print(f"{run_dir}: {url}/{_experiment_path(run_dir)}", flush=True)
        print("MLflow UI running; Ctrl-C stops it.", flush=True)
        while all(p.poll() is None for p in servers):
            time.sleep(1)
        return next(p.returncode for p in servers if p.poll() is not None)
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in servers:
            _signal_group(proc, signal.SIGTERM)
        for proc in servers:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
