"""Timing shared by the benchmark suites (not a suite: the leading underscore keeps it out of `bench all`).

The methodology every suite follows, because on a shared machine anything else flatters one side:
- methods are interleaved round by round (A, B, C, A, B, C, ...; the order rotates each round), so
  a burst of load from another job hits every method alike instead of one method's whole series;
- the clock is the process's CPU time on CPU (time.process_time: work done, not time waited for a
  core another job holds) and CUDA events on a GPU;
- every method reports the median with [min, max] of >= 5 repeats, never the best run alone;
- the load average is recorded before and after, so a reader can judge the machine's state.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch

MIN_REPEATS = 5


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so an interval covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def clock_name(device: torch.device) -> str:
    return "cuda_events" if device.type == "cuda" else "process_cpu_time"


def timed_seconds(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.process_time()
    fn()
    return time.process_time() - start


def summary_ms(samples_s: list[float]) -> dict:
    """median [min, max] in milliseconds of a method's samples."""
    ms = [s * 1e3 for s in samples_s]
    return {"ms": round(statistics.median(ms), 3), "min_ms": round(min(ms), 3), "max_ms": round(max(ms), 3), "repeats": len(ms)}


def interleaved_seconds(methods: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                        warmup: int = 1) -> dict[str, list[float]]:
    """Per method, `repeats` timed calls, interleaved round by round after `warmup` calls of each."""
    if repeats < MIN_REPEATS:
        raise ValueError(f"--repeats {repeats}: a median with [min, max] needs at least {MIN_REPEATS} repeats")
    names = list(methods)
    for _ in range(warmup):
        for name in names:
            methods[name]()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)  # rotate: no method always runs right after the same neighbour
        for name in names[shift:] + names[:shift]:
            samples[name].append(timed_seconds(methods[name], device))
    return samples


def interleaved(methods: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1) -> dict[str, dict]:
    """{method: {"ms": median, "min_ms", "max_ms", "repeats"}} of interleaved timings."""
    return {name: summary_ms(s) for name, s in interleaved_seconds(methods, repeats, device, warmup).items()}
