"""The learning-rate schedule over wall time (train.schedule: minutes)."""

import json
import math
import time

import pytest
import torch

from finetune.config import DataConfig, TrainConfig
from finetune.schedule import TrainingClock, make_scheduler, out_of_time, warmup_cosine


def test_warmup_cosine_shape():
    assert warmup_cosine(0.0, 0.1) == 0.0
    assert warmup_cosine(0.05, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(0.1, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(0.55, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(1.0, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(1.7, 0.1) == pytest.approx(0.0, abs=1e-12)  # past the budget: stays at zero


def test_minutes_schedule_follows_the_clock_not_the_steps():
    t = TrainConfig(data=DataConfig(train="x")).train
    t.schedule, t.max_minutes, t.warmup_ratio, t.lr = "minutes", 2.0, 0.0, 1.0
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    clock = TrainingClock()  # its readings set by hand below, as tick() would
    scheduler = make_scheduler(optimizer, t, total_steps=10**6, clock=clock)
    for now, expected in ((30, 0.5 * (1 + math.cos(math.pi / 4))), (60, 0.5), (119, None)):
        clock.value = now
        optimizer.step()
        scheduler.step()
        if expected is not None:
            assert scheduler.get_last_lr()[0] == pytest.approx(expected)
    assert scheduler.get_last_lr()[0] < 1e-3
    json.dumps(scheduler.state_dict())  # checkpoints store it as JSON
    assert not out_of_time(t, clock)
    clock.value = 120
    assert out_of_time(t, clock)


def test_minutes_schedule_needs_max_minutes():
    cfg = TrainConfig(data=DataConfig(train="x"))
    cfg.train.schedule = "minutes"
    with pytest.raises(ValueError, match="needs train.max_minutes"):
        cfg.validate()
    cfg.train.schedule = "hours"
    with pytest.raises(ValueError, match="train.schedule must be"):
        cfg.validate()



def test_tick_reads_the_clock_once_per_step():
    clock = TrainingClock(already=30.0)
    assert clock.value == 30.0  # a resumed run starts from its saved time
    reading = clock.tick()
    assert 30.0 <= reading < 31.0 and clock.value == reading
    time.sleep(0.05)
    assert clock.value == reading  # the schedule and the stop test see one reading per step
    assert clock.tick() >= reading + 0.05
