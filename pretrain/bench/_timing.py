"""Timing shared by the benchmark suites (not a suite: the leading underscore keeps it out of `bench all`).

The methodology every suite follows, because on a shared machine anything else flatters one side:
- methods are interleaved round by round (A, B, C, A, B, C, ...; the order rotates each round), so
  a burst of load from another job hits every method alike instead of one method's whole series;
- the clock is the process's CPU time on CPU (time.process_time: work done, not time waited for a
  core another job holds) and CUDA events on a GPU;
- every method reports the median with [min, max] of >= 5 repeats, never the best run alone;
- the load average is recorded before and after, so a reader can judge the machine's state;
- glibc's allocator is pinned (pin_allocator): by default it moves its mmap/trim thresholds as
  memory is freed, so whether a step's large buffers come back as fresh pages (page faults, counted
  in process CPU time) depended on which models ran before: the same 16k step measured 26 or 37 ms.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch

MIN_REPEATS = 5
# glibc mallopt parameters and the values pinned: blocks under 32 MiB (the largest fixed threshold
# glibc accepts) come from the heap, and freed heap memory is kept for the next step, not trimmed.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
PINNED = {"mmap_threshold_bytes": 32 * 2**20, "trim_threshold_bytes": 2**31 - 1}


def pin_allocator() -> dict | None:
    """Fixed glibc malloc thresholds for this process (what was set), or None off glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None
    ok = mallopt(_M_MMAP_THRESHOLD, PINNED["mmap_threshold_bytes"]) and mallopt(_M_TRIM_THRESHOLD, PINNED["trim_threshold_bytes"])
    return dict(PINNED) if ok else None


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


def rotated_rounds(names: list[str], repeats: int):
    """The order of every method in each of `repeats` rounds, rotating so that no method always runs
    right after the same neighbour."""
    for round_index in range(repeats):
        shift = round_index % len(names)
        yield names[shift:] + names[:shift]


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
    for order in rotated_rounds(names, repeats):
        for name in order:
            samples[name].append(timed_seconds(methods[name], device))
    return samples


def interleaved(methods: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1) -> dict[str, dict]:
    """{method: {"ms": median, "min_ms", "max_ms", "repeats"}} of interleaved timings."""
    return {name: summary_ms(s) for name, s in interleaved_seconds(methods, repeats, device, warmup).items()}
