"""The learning rate of each training step: linear warmup, then constant, linear or cosine decay to a floor.

With peak rate ``lr``, ``W`` warmup steps, ``T = max_steps`` and floor ratio ``m`` (``min_lr_ratio``), step
``t`` (1-based: the first update is step 1) trains at

    t <= W:   lr * t / W
    t >  W:   p = (t - W) / (T - W)
              constant  lr
              linear    lr * (m + (1 - m) * (1 - p))
              cosine    lr * (m + (1 - m) * (1 + cos(pi * p)) / 2)

so warmup reaches the peak at step W and decay reaches ``m * lr`` at the last step. Every optimizer step of a
training step (``num_iterations`` of them) uses that step's rate. The rate is a function of the step alone:
a run resumed from a checkpoint goes on with exactly the rates of an uninterrupted one (a resume with a larger
``max_steps`` stretches the decay over the new horizon, as Hugging Face's schedulers do).
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "linear", "cosine")


def warmup_steps_of(max_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """The warmup length: ``warmup_steps``, or ``warmup_ratio`` of ``max_steps`` rounded up when it is set."""
    return math.ceil(warmup_ratio * max_steps) if warmup_ratio else warmup_steps


def learning_rate_at(step: int, *, peak: float, schedule: str, warmup_steps: int, max_steps: int,
                     min_lr_ratio: float = 0.0) -> float:
    """The learning rate of training step ``step`` (1-based), as the module docstring writes it."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    if warmup_steps > 0 and step <= warmup_steps:
        return peak * step / warmup_steps
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (min_lr_ratio + (1.0 - min_lr_ratio) * shape)


__all__ = ["LR_SCHEDULES", "learning_rate_at", "warmup_steps_of"]
