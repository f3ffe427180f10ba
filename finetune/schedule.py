"""The learning-rate schedule: warmup then cosine decay to zero, measured either in optimizer steps
(`train.schedule: steps`, the default) or in wall time (`train.schedule: minutes`).

The minutes form is for a fixed time budget (a lent GPU, a laptop's lunch break): the run stops on
`train.max_minutes` and its learning rate has still warmed up and annealed over exactly that time, which a
step-based schedule can only do if the steps per minute are known beforehand."""

from __future__ import annotations

import math
import time

from torch.optim.lr_scheduler import LambdaLR
from transformers import get_cosine_schedule_with_warmup

SCHEDULES = ("steps", "minutes")


class TrainingClock:
    """Wall time spent training, carried across resumes (checkpoints store `seconds()`)."""

    def __init__(self, already: float = 0.0):
        self.started = time.time() - already

    def seconds(self) -> float:
        return time.time() - self.started

    def resume_at(self, seconds: float) -> None:
        self.started = time.time() - seconds


def warmup_cosine(progress: float, warmup: float) -> float:
    """The learning-rate factor at `progress` (0..1) of the run: linear warmup, then cosine to zero."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / max(1.0 - warmup, 1e-9)))


def make_scheduler(optimizer, t, total_steps: int, clock: TrainingClock):
    """`t` holds the train settings (schedule, warmup_ratio, max_minutes)."""
    if t.schedule == "minutes":
        budget = t.max_minutes * 60
        # A plain closure (not a callable object) keeps the scheduler's state_dict JSON-serialisable.
        return LambdaLR(optimizer, lambda _step: warmup_cosine(clock.seconds() / budget, t.warmup_ratio))
    return get_cosine_schedule_with_warmup(optimizer, int(total_steps * t.warmup_ratio), total_steps)


def out_of_time(t, clock: TrainingClock) -> bool:
    return bool(t.max_minutes) and clock.seconds() / 60 >= t.max_minutes
