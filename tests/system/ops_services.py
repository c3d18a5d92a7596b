"""Real services for the system tests: a throw-away SLURM cluster, an MLflow server, headless Chromium.

Each helper skips the calling test with a clear reason only when the service cannot exist on this
machine (not root, packages missing: `make system-deps` installs them); any other failure to start
is an error, with the service's log in the message.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_CLUSTER = REPO / "slurm" / "testing" / "start_cluster.sh"
STOP_CLUSTER = REPO / "slurm" / "testing" / "stop_cluster.sh"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    detail = log.read_text()[-3000:] if log and log.is_file() else ""
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s (process status {proc and proc.poll()})\n{detail}")


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, with its children (uvicorn workers)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start_mlflow_server(root: Path, port: int) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on 127.0.0.1:port with a SQLite store and proxied artifacts under root."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/server.db",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", 120, proc, log)
    except RuntimeError:
        stop_group(proc)
        raise
    return proc, url


def render_dom(url: str, profile_dir: Path, budget_ms: int = 20000) -> str:
    """The DOM of a page after its scripts ran, from headless Chromium."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make system-deps installs it)")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile_dir}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"chromium failed ({out.returncode}): {out.stderr[-2000:]}"
    return out.stdout


class SlurmCluster:
    """slurm/testing/start_cluster.sh: munged, slurmctld and `nodes` slurmd -N, all under `root`."""

    def __init__(self, root: Path, nodes: int, cpus_per_node: int) -> None:
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        if os.geteuid() != 0:
            pytest.skip("the SLURM test cluster needs root (slurmd starts jobs as their users); CI runs as root")
        missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(t) is None]
        if missing:
            pytest.skip(f"{', '.join(missing)} not installed: `make system-deps` installs slurm-wlm and munge")
        out = subprocess.run(["bash", str(START_CLUSTER), str(root), str(nodes), str(cpus_per_node)],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"start_cluster.sh failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr}")
        return out.stdout

    def sbatch(self, script: str, *args: str, options: list[str], env: dict | None = None) -> int:
        out = subprocess.run(["sbatch", "--parsable", *options, str(REPO / script), *args],
                             env={**self.env, **(env or {})}, cwd=REPO, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed: {out.stderr}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        text = self.run("scontrol", "show", "job", str(job_id), "--oneliner")
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: int, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s")

    def stop(self) -> None:
        subprocess.run(["bash", str(STOP_CLUSTER), str(self.root)], capture_output=True, timeout=120)
