"""Learning rate: linear warmup, then cosine decay to min_lr_ratio * lr.

A pure function of the step, set on the optimizer before every step: resuming needs nothing but the
step number, and a skipped (NaN) step moves the schedule exactly like an applied one.
"""
from __future__ import annotations

import math


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step `step` (1-based: the first update is step 1)."""
    if step < 1:
        raise ValueError(f"steps are counted from 1, got {step}")
    if warmup_steps and step <= warmup_steps:
        return base_lr * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def lr_for_config(step: int, train_cfg) -> float:
    return lr_at(step, base_lr=train_cfg.lr, warmup_steps=train_cfg.warmup_steps, total_steps=train_cfg.steps,
                 min_lr_ratio=train_cfg.min_lr_ratio)


def set_lr(optimizer, lr: float) -> None:
    """Each param group may carry an 'lr_scale' (e.g. the learned target table)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
