"""Per-step metrics: averaged across ranks, written to metrics.jsonl, shown on a progress bar.

One all-reduce per step carries every rank's sums (loss, cosine, prediction norm, batch
fingerprint) together with the preemption flag, so ranks also agree on when to stop.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Slots of the per-step all-reduce vector.
FIELDS = ("loss_sum", "loss_n", "cos_sum", "norm_sum", "cont_n", "acc_sum", "acc_n", "fingerprint", "preempt",
          "skipped_shards", "skipped_samples")


class StepStats:
    """This rank's contribution to one optimizer step."""

    def __init__(self) -> None:
        # Tensors stay on the device until the one all-reduce: no host sync per micro-batch.
        self.values: dict = dict.fromkeys(FIELDS, 0.0)

    def add_micro(self, result: dict) -> None:
        """Metrics of one micro-batch (a model/loss result dict of tensors)."""
        self.values["loss_sum"] = self.values["loss_sum"] + result["loss"].detach().double()
        self.values["loss_n"] += 1
        if "mean_cos" in result:
            self.values["cos_sum"] = self.values["cos_sum"] + result["mean_cos"].double()
            self.values["norm_sum"] = self.values["norm_sum"] + result["mean_pred_norm"].double()
            self.values["cont_n"] += 1
        if "accuracy" in result:
            self.values["acc_sum"] = self.values["acc_sum"] + result["accuracy"].double()
            self.values["acc_n"] += 1

    def add_batch(self, input_ids: torch.Tensor) -> None:
        """A checksum of the samples consumed: resumed and uninterrupted runs must agree on it."""
        self.values["fingerprint"] += zlib.crc32(input_ids.cpu().numpy().tobytes())

    def reduce(self, device: torch.device) -> dict[str, float]:
        vec = torch.stack([torch.as_tensor(self.values[k], dtype=torch.float64).to(device) for k in FIELDS])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
        return dict(zip(FIELDS, vec.tolist()))


def summarize(totals: dict[str, float]) -> dict[str, float]:
    """Global means from the all-reduced sums (NaN loss stays NaN: the guard needs to see it)."""
    out = {"loss": totals["loss_sum"] / max(totals["loss_n"], 1)}
    if totals["cont_n"]:
        out["mean_cos"] = totals["cos_sum"] / totals["cont_n"]
        out["mean_pred_norm"] = totals["norm_sum"] / totals["cont_n"]
    if totals["acc_n"]:
        out["accuracy"] = totals["acc_sum"] / totals["acc_n"]
    out["data_fingerprint"] = int(totals["fingerprint"])
    # Corrupt shards skipped so far by all ranks (data.on_corrupt_shard=skip).
    out["skipped_shards"] = int(totals["skipped_shards"])
    out["skipped_samples"] = int(totals["skipped_samples"])
    return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf; the row's "skipped" says what happened
    return value


class MetricsLog:
    """metrics.jsonl in the run dir (rank 0 only); on resume, rows after the checkpoint are dropped.

    The dropped rows are remembered: the resumed run replays those steps, and a replayed row equal
    to the dropped one (an exact resume) was already sent to MLflow, which would otherwise show the
    step twice (``already_sent``).
    """

    # Per-step values that identify a replay of the same step (same data, same numbers).
    REPLAY_KEYS = ("loss", "lr", "data_fingerprint")

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path = path
        self.enabled = enabled
        self.dropped: dict[int, dict] = {}
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            rows = self._rows()
            self.dropped = {step: json.loads(line) for step, line in rows if step > resume_step}
            kept = [line for step, line in rows if step <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)

    def _rows(self) -> list[tuple[int, str]]:
        """(step, line) of every row. A torn last line (the disk filled during an append) is dropped
        with a warning: the checkpoint, not this file, says which step comes next."""
        lines = [line for line in self.path.read_text(errors="replace").splitlines() if line.strip()]
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                rows.append((int(json.loads(line)["step"]), line))
            except (ValueError, KeyError, TypeError) as exc:
                if number < len(lines):
                    raise ValueError(f"{self.path} line {number} is not a metrics row ({exc}); move the file aside "
                                     "to resume (the checkpoint holds the training state)") from None
                log.warning("%s: dropping its torn last line %d (%s), probably cut off by a full disk or a crash",
                            self.path, number, exc)
        return rows

    def already_sent(self, row: dict) -> bool:
        """True for a replayed step whose values equal those logged before the restart."""
        before = self.dropped.get(row["step"])
        return before is not None and all(before.get(k) == _json_safe(row.get(k)) for k in self.REPLAY_KEYS)

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({k: _json_safe(v) for k, v in row.items()}) + "\n")


class Throughput:
    """Tokens/s between two calls (wall clock)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        return rate
