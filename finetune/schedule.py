"""The learning-rate schedule: warmup then cosine decay to zero, measured either in optimizer steps
(`train.schedule: steps`, the default) or in wall time (`train.schedule: minutes`).

The minutes form is for a fixed time budget (a GPU for an hour, a laptop's lunch break): the run stops on
`train.max_minutes` and its learning rate has still warmed up and annealed over exactly that time, which a
step-based schedule can only do if the steps per minute are known beforehand."""

from __future__ import annotations

import math
import time

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_cosine_schedule_with_warmup

SCHEDULES = ("steps", "minutes")


class TrainingClock:
    """Wall time spent training, carried across resumes (checkpoints store `seconds()`). `tick()` reads it
    once per optimizer step; with several processes the main one's reading is broadcast, so every
    process anneals and stops at the same step (their own clocks differ by milliseconds)."""

    def __init__(self, already: float = 0.0):
        self.started = time.time() - already
        self.value = already

    def seconds(self) -> float:
        return time.time() - self.started

    def resume_at(self, seconds: float) -> None:
        self.started = time.time() - seconds
        self.value = seconds

    def tick(self, accelerator=None) -> float:
        value = self.seconds()
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            value = float(broadcast(torch.tensor([value], dtype=torch.float64, device=accelerator.device))[0])
        self.value = value
        return value


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
        return LambdaLR(optimizer, lambda _step: warmup_cosine(clock.value / budget, t.warmup_ratio))
    return get_cosine_schedule_with_warmup(optimizer, int(total_steps * t.warmup_ratio), total_steps)


def out_of_time(t, clock: TrainingClock) -> bool:
    """Whether train.max_minutes is used up, at the clock's last tick."""
    return bool(t.max_minutes) and clock.value / 60 >= t.max_minutes
