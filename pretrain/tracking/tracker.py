"""MLflow tracking of a training run: params, per-step metrics, system info, artifacts.

Only rank 0 talks to MLflow; every other rank gets a ``NullTracker`` whose methods do nothing.
Without ``tracking.tracking_uri`` the store is SQLite inside the run directory, so no server is
needed. The MLflow run id is kept in ``<run_dir>/mlflow_run.json``: a resumed run (same run
directory, e.g. after a SLURM requeue) continues the same MLflow run.

A tracking server that cannot be reached never stops training. The tracker warns once and appends
everything it would have sent to ``<run_dir>/mlflow_pending.jsonl``; that backlog is sent, in
order, as soon as the server answers again (checked every ``tracking.retry_seconds``, when the run
closes and when it resumes), or by hand with ``pretrain ui RUN_DIR --sync``.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable

from pretrain.config import Config, flatten, save_resolved

log = logging.getLogger(__name__)

LOCAL_STORE = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
RUN_RECORD = "mlflow_run.json"
PENDING = "mlflow_pending.jsonl"

# MLflow's own limits (mlflow.utils.validation).
_MAX_PARAM_LEN = 6000
_MAX_KEY_LEN = 250
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


def local_store_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / LOCAL_STORE}"


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_reachable(uri: str, timeout: float) -> bool:
    """A quick GET /health for an HTTP tracking server; any other store counts as reachable."""
    if not is_remote(uri):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def read_run_record(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable %s (%s): this run starts a new MLflow run", path, exc)
        return None
    return record if isinstance(record, dict) else None


def system_info(world_size: int | None = None) -> dict[str, str]:
    """Where and with what the run trains, as MLflow tags (tags, unlike params, may change on resume)."""
    import torch

    info = {
        "system.hostname": socket.gethostname(),
        "system.python": platform.python_version(),
        "system.platform": platform.platform(),
        "system.torch": torch.__version__,
        "system.cuda": str(torch.version.cuda),
        "system.cpu_count": str(os.cpu_count()),
        "system.world_size": str(world_size or _world_size_from_env()),
    }
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["system.devices"] = f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
    else:
        info["system.devices"] = f"cpu ({platform.processor() or platform.machine()})"
    for dist in ("deepspeed", "mlflow", "triton", "faiss-cpu", "faiss-gpu"):
        try:
            info[f"system.{dist}"] = importlib.metadata.version(dist)  # no import: deepspeed's is slow
        except importlib.metadata.PackageNotFoundError:
            pass
    for env in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_RESTART_COUNT"):
        if os.environ.get(env):
            info[f"system.{env.lower()}"] = os.environ[env]
    commit = _git_commit()
    if commit:
        info["system.git_commit"] = commit
    return info


def _world_size_from_env() -> int:
    for env in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(env, "").isdigit():
            return int(os.environ[env])
    return 1


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _metric_key(key: Any) -> str:
    return _BAD_KEY_CHARS.sub("_", str(key))[:_MAX_KEY_LEN]


def _as_number(value: Any) -> float | None:
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # not a single element
            return None
    if isinstance(value, (bool, int, float)):
        return float(value)
    return None


class NullTracker:
    """The tracker of ranks other than 0, and of runs with tracking.enabled false."""

    enabled = False
    run_id: str | None = None
    tracking_uri: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type else "FINISHED")


class Tracker(NullTracker):
    """Rank 0's tracker: one MLflow run per run directory, resilient to an unreachable server."""

    enabled = True

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tracking_uri: str | None = None,
        experiment: str = "softmax-free-pretraining",
        run_name: str | None = None,
        retry_seconds: float = 60.0,
        http_timeout_s: int = 5,
        mark_running: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from mlflow import MlflowClient

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri or local_store_uri(self.run_dir)
        self.experiment = experiment
        self.run_name = run_name or self.run_dir.resolve().name
        self.retry_seconds = retry_seconds
        self.http_timeout_s = http_timeout_s
        self.pending_path = self.run_dir / PENDING
        self.dropped = 0  # records MLflow refused (bad key/value) while reachable
        self._clock = clock
        self._mark_running = mark_running
        if is_remote(self.tracking_uri):
            # MLflow retries a failed request 7 times with exponential backoff (minutes); we keep our
            # own backlog instead, so fail fast. A user's explicit setting wins.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(http_timeout_s))
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        self.run_id = self._previous_run_id()
        self.resumed = self.run_id is not None
        if not self.resumed:
            self._write_run_record(experiment_id=None)  # so `--sync` knows the server even if it never answers
        self._online = False
        self._warned_offline = False
        self._next_retry = 0.0
        self._logged_params: dict[str, str] = {}
        self.existing_tags: dict[str, str] = {}  # of a resumed run, as found on the store
        self._connect()

    # Connection -----------------------------------------------------------------------------
    def _previous_run_id(self) -> str | None:
        record = read_run_record(self.run_dir)
        if not record:
            return None
        if record.get("tracking_uri") != self.tracking_uri:
            log.warning(
                "%s names a run on %s, but tracking now goes to %s: starting a new MLflow run there",
                self.run_dir / RUN_RECORD, record.get("tracking_uri"), self.tracking_uri,
            )
            return None
        return record.get("run_id")

    def _connect(self) -> bool:
        """Reach the store, create or resume the run, send the backlog. False when unreachable."""
        self._next_retry = self._clock() + self.retry_seconds
        if not server_reachable(self.tracking_uri, self.http_timeout_s):
            self._went_offline(f"no answer from {self.tracking_uri}/health")
            return False
        try:
            if self.run_id is not None:
                self._resume_run()
            if self.run_id is None:
                self._create_run()
        except Exception as exc:  # noqa: BLE001 - whatever the store raises, training goes on
            if not self._store_answered(exc):
                self._went_offline(exc)
                return False
            raise
        self._online = True
        if self._warned_offline:
            log.warning("MLflow tracking at %s is reachable again", self.tracking_uri)
        self._warned_offline = False
        self.flush_pending()
        return self._online

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(self.experiment)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise ValueError(
                    f"MLflow experiment {self.experiment!r} on {self.tracking_uri} is deleted: restore it "
                    "(mlflow experiments restore) or set tracking.experiment to another name"
                )
            return found.experiment_id
        # A local store keeps its artifacts next to it; a server decides for itself.
        location = None if is_remote(self.tracking_uri) else (self.run_dir.resolve() / LOCAL_ARTIFACTS).as_uri()
        try:
            return self._client.create_experiment(self.experiment, artifact_location=location)
        except MlflowException:  # created meanwhile by another run
            found = self._client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _create_run(self) -> None:
        # Schema creation of a new SQLite store is chatty.
        chatty = [logging.getLogger(name) for name in ("alembic", "mlflow.store.db.utils")]
        levels = [logger.level for logger in chatty]
        for logger in chatty:
            logger.setLevel(logging.WARNING)
        try:
            experiment_id = self._experiment_id()
        finally:
            for logger, level in zip(chatty, levels):
                logger.setLevel(level)
        run = self._client.create_run(experiment_id, run_name=self.run_name, tags={"run_dir": str(self.run_dir.resolve())})
        self.run_id = run.info.run_id
        self._write_run_record(experiment_id)
        log.info("MLflow run %s (%s) on %s", self.run_name, self.run_id, self.tracking_uri)

    def _write_run_record(self, experiment_id: str | None) -> None:
        record = {"tracking_uri": self.tracking_uri, "experiment": self.experiment, "experiment_id": experiment_id, "run_id": self.run_id}
        tmp = self.run_dir / (RUN_RECORD + ".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(self.run_dir / RUN_RECORD)

    def _resume_run(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(self.run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("MLflow run %s from %s is gone from %s: starting a new run", self.run_id, RUN_RECORD, self.tracking_uri)
            self.run_id = None
            return
        self._logged_params = dict(run.data.params)
        self.existing_tags = dict(run.data.tags)
        if self._mark_running:
            self._client.update_run(self.run_id, status="RUNNING")
        log.info("MLflow: continuing run %s (%s) on %s", run.info.run_name, self.run_id, self.tracking_uri)

    def _went_offline(self, reason: Any) -> None:
        self._online = False
        if self._warned_offline:
            return
        self._warned_offline = True
        if not self._mark_running:  # `pretrain ui --sync`: nothing runs on, the backlog just stays
            log.warning("MLflow tracking at %s is unreachable (%s): the records stay in %s; rerun `pretrain ui %s "
                        "--sync` once the server answers", self.tracking_uri, reason, self.pending_path, self.run_dir)
            return
        log.warning(
            "MLflow tracking at %s is unreachable (%s). This command goes on; tracking records are kept in %s "
            "and sent when the server answers again (retried every %.0f s, at the end and on resume; "
            "or by hand: pretrain ui %s --sync)",
            self.tracking_uri, reason, self.pending_path, self.retry_seconds, self.run_dir,
        )

    # Records ---------------------------------------------------------------------------------
    def _submit(self, record: dict) -> None:
        if not self._online and self._clock() >= self._next_retry:
            try:
                self._connect()
            except Exception as exc:  # noqa: BLE001 - at start it raises; mid-run it must not
                self._went_offline(exc)
        if self._online:
            try:
                self._apply([record])
                return
            except Exception as exc:  # noqa: BLE001 - never let tracking kill training
                if not self._refused(exc, record):
                    self._went_offline(exc)
        self._append_pending(record)

    def _store_answered(self, exc: Exception) -> bool:
        """Did the store itself answer with this error (True), or not answer at all (timeout, refused
        connection, a proxy's 5xx)? Deciding from the error, not from a health check, keeps a hung
        server to one http_timeout_s per record instead of two (request, then health check)."""
        from mlflow.exceptions import MlflowException, RestException

        if not is_remote(self.tracking_uri) or isinstance(exc, RestException):
            return True
        # MLflow wraps a timeout or a failed connection in a plain MlflowException; other errors
        # (e.g. our own "experiment deleted") come from an answer.
        return not isinstance(exc, (MlflowException, OSError))

    def _refused(self, exc: Exception, record: dict) -> bool:
        """A store that answers but refuses a record: drop it (counted) rather than retry it forever."""
        if not self._store_answered(exc):
            return False
        self.dropped += 1
        log.warning("MLflow refused a %s record (%s); dropped it (%d so far)", record.get("op"), exc, self.dropped)
        return True

    def _append_pending(self, record: dict) -> None:
        with self.pending_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def flush_pending(self) -> int:
        """Send the backlog in order; returns how many records were sent (0 if none or offline)."""
        if not self.pending_path.is_file():
            return 0
        records = [json.loads(line) for line in self.pending_path.read_text().splitlines() if line.strip()]
        sent = 0
        for start in range(0, len(records), 256):
            chunk = records[start : start + 256]
            try:
                self._apply(chunk)
            except Exception as exc:  # noqa: BLE001
                if not self._store_answered(exc):
                    self._went_offline(exc)
                    self._rewrite_pending(records[start:])
                    return sent
                for record in chunk:  # find the refused record(s) one by one
                    try:
                        self._apply([record])
                    except Exception as exc2:  # noqa: BLE001
                        if not self._refused(exc2, record):
                            self._went_offline(exc2)
                            self._rewrite_pending(records[start:])
                            return sent
            sent += len(chunk)
        self.pending_path.unlink()
        log.info("MLflow: sent %d kept records to %s", sent, self.tracking_uri)
        return sent

    def _rewrite_pending(self, records: list[dict]) -> None:
        tmp = self.pending_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(self.pending_path)

    def _apply(self, records: Iterable[dict]) -> None:
        """Send records in order, batching consecutive metrics into few requests."""
        from mlflow.entities import Metric, Param, RunTag

        metrics: list[Metric] = []

        def send_metrics() -> None:
            self._log_batches("metrics", metrics, _MAX_METRICS_PER_BATCH)
            metrics.clear()

        for record in records:
            op = record["op"]
            if op == "metrics":
                metrics.extend(Metric(k, v, record["ts"], record["step"]) for k, v in record["metrics"].items())
                continue
            send_metrics()
            if op == "params":
                params = [Param(k, v) for k, v in record["params"].items() if self._logged_params.get(k) != v]
                self._log_batches("params", params, _MAX_PARAMS_PER_BATCH)
                self._logged_params.update((p.key, p.value) for p in params)
            elif op == "tags":
                self._log_batches("tags", [RunTag(k, v) for k, v in record["tags"].items()], _MAX_PARAMS_PER_BATCH)
            elif op == "artifact":
                self._send_artifact(Path(record["path"]), record.get("artifact_path"))
            elif op == "status":
                self._client.set_terminated(self.run_id, status=record["status"], end_time=record["ts"])
            else:
                raise ValueError(f"unknown tracking record {op!r} in {self.pending_path}")
        send_metrics()

    def _log_batches(self, kind: str, entities: list, per_request: int) -> None:
        """MLflow's log_batch in requests of at most ``per_request`` metrics, params or tags."""
        for i in range(0, len(entities), per_request):
            self._client.log_batch(self.run_id, **{kind: entities[i : i + per_request]})

    def _send_artifact(self, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path or path.name)
        elif path.is_file():
            self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)
        else:
            log.warning("MLflow artifact %s vanished before it could be sent; skipped", path)

    # Public API --------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Nested dicts are flattened (train.lr); values become strings (MLflow params are strings).

        A resumed run keeps its first values: a param that changed on resume is reported in a
        warning and kept as a ``resume_changed.<key>`` tag, since MLflow refuses to overwrite params.
        """
        flat = {str(k)[:_MAX_KEY_LEN]: str(v)[:_MAX_PARAM_LEN] for k, v in flatten(params).items()}
        changed = {k: v for k, v in flat.items() if k in self._logged_params and self._logged_params[k] != v}
        if changed:
            log.warning(
                "MLflow params changed since this run started (%s); the run keeps the first values, the new ones "
                "are tagged resume_changed.<key>", ", ".join(f"{k}: {self._logged_params[k]} -> {v}" for k, v in changed.items()),
            )
            self.set_tags({f"resume_changed.{k}": v for k, v in changed.items()})
        fresh = {k: v for k, v in flat.items() if k not in changed}
        if fresh:
            self._submit({"op": "params", "params": fresh})

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Numbers only (Python, numpy or 0-d torch); other values are left out with a debug note."""
        numbers = {}
        for key, value in metrics.items():
            number = _as_number(value)
            if number is None:
                log.debug("MLflow: metric %r=%r is not a number; not logged", key, value)
                continue
            numbers[_metric_key(key)] = number
        if numbers:
            self._submit({"op": "metrics", "step": int(step), "ts": int(time.time() * 1000), "metrics": numbers})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not tags:
            return
        self._submit({"op": "tags", "tags": {_metric_key(k): str(v)[:_MAX_PARAM_LEN] for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or a whole directory; a path that does not exist is reported and skipped."""
        path = Path(path).resolve()
        if not path.exists():
            log.warning("MLflow: artifact %s does not exist; not logged", path)
            return
        self._submit({"op": "artifact", "path": str(path), "artifact_path": artifact_path})

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run (FINISHED, FAILED or KILLED); a resume marks it RUNNING again."""
        if not self._online:
            self._next_retry = 0.0  # one last attempt, however recent the previous one
        self._submit({"op": "status", "status": status, "ts": int(time.time() * 1000)})
        if self.pending_path.is_file():
            log.warning(
                "MLflow tracking at %s still unreachable: the run's records stay in %s; they are sent when "
                "this run resumes, or now with: pretrain ui %s --sync",
                self.tracking_uri, self.pending_path, self.run_dir,
            )


def start_tracking(
    cfg: Config, run_dir: str | Path, rank: int, *, world_size: int | None = None,
    inputs: dict[str, list[Path]] | None = None,
) -> NullTracker:
    """The tracker of one training process: real on rank 0 with tracking enabled, a no-op otherwise.

    On rank 0 it starts (or resumes) the MLflow run and logs the flattened config as params and the
    system info as tags; a new run also gets the resolved config and its input files as artifacts
    (``inputs``: artifact folder -> files; by default pretraining's: the tokenizer, the data manifest
    and the target-table report). A resumed run (a requeued job, or `pretrain eval` adding its
    metrics to the training run) keeps the system tags of its start.
    """
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    t = cfg.tracking
    tracker = Tracker(
        run_dir,
        tracking_uri=t.tracking_uri,
        experiment=t.experiment,
        run_name=t.run_name,
        retry_seconds=t.retry_seconds,
        http_timeout_s=t.http_timeout_s,
    )
    tracker.log_params(cfg.to_dict())
    tags = {**system_info(world_size), "config_digest": cfg.digest()}
    tracker.set_tags({k: v for k, v in tags.items() if k not in tracker.existing_tags})
    if tracker.resumed:
        return tracker
    config_file = Path(run_dir) / "config.resolved.yaml"
    if not config_file.is_file():
        save_resolved(cfg, run_dir)
    tracker.log_artifact(config_file)
    if inputs is None:
        inputs = {"data": [cfg.data_dir / "tokenizer.model", cfg.data_dir / "manifest.json"],
                  "targets": [cfg.targets_path.parent / "report.json"]}
    for artifact_path, files in inputs.items():
        for path in files:
            if path.is_file():  # a stage that has not run yet just has nothing to add
                tracker.log_artifact(path, artifact_path=artifact_path)
    return tracker


def sync_pending(run_dir: str | Path, tracking_uri: str | None = None) -> tuple[int, int]:
    """Send a run's kept records (``mlflow_pending.jsonl``) to its server: (sent, still pending)."""
    run_dir = Path(run_dir)
    pending = run_dir / PENDING
    if not pending.is_file():
        return 0, 0
    record = read_run_record(run_dir) or {}
    uri = tracking_uri or record.get("tracking_uri")
    if not uri:
        raise ValueError(
            f"{pending} has records but {run_dir / RUN_RECORD} names no tracking server: "
            "pass the server with --tracking-uri http://HOST:PORT"
        )
    before = _count_lines(pending)
    # Connecting sends the backlog.
    Tracker(run_dir, tracking_uri=uri, experiment=record.get("experiment", "softmax-free-pretraining"), mark_running=False)
    left = _count_lines(pending)
    return before - left, left


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.open() if line.strip()) if path.is_file() else 0
