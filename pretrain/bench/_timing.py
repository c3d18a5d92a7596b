"""Timing shared by the benchmark suites (not a suite: the leading underscore keeps it out of `bench all`)."""
from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock interval covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(step, repeats: int, device: torch.device) -> float:
    """Best wall time of `repeats` calls of step() after one warm-up call (compilation, allocator, threads)."""
    step()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best
