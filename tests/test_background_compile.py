"""A background compile and the replies served meanwhile: short GIL slices, pauses while a reply computes."""

import sys
import threading
import time

import pytest
import torch
from helpers import image_question, random_image, tiny_config

from assistant.cpu import background_compile
from assistant.cpu.background_compile import (COMPILE_SWITCH_INTERVAL, computed_while_replying, replying,
                                          short_gil_slices, yielding_to_replies)
from assistant.model.builder import build_model
from assistant.inference.engine import ChatSession, Engine
from assistant.inference.generation import GenerationConfig


def test_compiling_shortens_the_thread_switch_interval_and_gives_it_back():
    before = sys.getswitchinterval()
    inside, release = threading.Event(), threading.Event()

    def second_compile():  # a second decoder compiling at the same time, finishing after the first
        with short_gil_slices():
            inside.set()
            release.wait(10)

    other = threading.Thread(target=second_compile)
    with short_gil_slices():
        assert sys.getswitchinterval() <= COMPILE_SWITCH_INTERVAL + 1e-9
        other.start()
        assert inside.wait(10)
    assert sys.getswitchinterval() <= COMPILE_SWITCH_INTERVAL + 1e-9  # the other one still compiles
    release.set()
    other.join(10)
    assert sys.getswitchinterval() == before


class Worker(threading.Thread):
    """Python work that raises audited events (id()), as Dynamo's tracing does; counts its rounds."""

    def __init__(self, yields: bool):
        super().__init__(daemon=True)
        self.yields, self.rounds, self.started, self.stop = yields, 0, threading.Event(), threading.Event()

    def run(self):
        with yielding_to_replies(self.yields):
            self.started.set()
            while not self.stop.is_set():
                id(self)
                self.rounds += 1

    def rounds_during(self, seconds: float) -> int:
        before = self.rounds
        time.sleep(seconds)
        return self.rounds - before


@pytest.fixture
def workers():
    made = []

    def make(yields):
        worker = Worker(yields)
        worker.start()
        assert worker.started.wait(10)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.stop.set()
        worker.join(10)


def test_a_compile_that_yields_pauses_while_a_reply_computes_and_goes_on_after(workers):
    yielding, other = workers(True), workers(False)
    assert yielding.rounds_during(0.05) > 0
    with replying():
        time.sleep(0.05)  # the yielding thread reaches its next event and waits there
        assert yielding.rounds_during(0.2) == 0
        assert other.rounds_during(0.05) > 0  # a thread not yielding goes on
    assert yielding.rounds_during(0.05) > 0


def test_a_compile_yields_at_most_its_allowance_plus_a_share_of_its_time(workers, monkeypatch):
    monkeypatch.setattr(background_compile, "PAUSE_ALLOWANCE_S", 0.3)
    monkeypatch.setattr(background_compile, "PAUSE_SHARE", 0.0)
    yielding = workers(True)
    with replying():  # a reply that never ends (or waits on something the compile holds)
        time.sleep(0.1)
        assert yielding.rounds_during(0.1) == 0
        time.sleep(0.3)
        assert yielding.rounds_during(0.1) > 0  # its 0.3 s are spent: it goes on


def test_computed_while_replying_marks_each_item_not_the_callers_work():
    seen = []

    def steps():
        for k in range(3):
            seen.append(background_compile._replies)
            yield k

    closed = []

    def endless():
        try:
            while True:
                yield 0
        finally:
            closed.append(True)

    for _ in computed_while_replying(steps()):
        assert background_compile._replies == 0
    assert seen == [1, 1, 1] and background_compile._replies == 0
    for _ in computed_while_replying(endless()):
        break  # a caller that stops early closes the steps at once
    assert closed == [True]


def test_the_engine_marks_its_prompts_steps_and_images_as_replying(tiny_llm_dir):
    torch.manual_seed(0)
    model, processor = build_model(tiny_config(tiny_llm_dir))
    engine = Engine(model, processor)
    marked = []
    model.llm.register_forward_pre_hook(lambda *_: marked.append(background_compile._replies))
    model.vision_tower.register_forward_pre_hook(lambda *_: marked.append(background_compile._replies))
    session = ChatSession()
    session.add_user_message("What is this?", [random_image(1)])
    for _ in engine.stream_chat(session, GenerationConfig(max_new_tokens=4)):
        assert background_compile._replies == 0  # the caller's time between deltas is not the reply's
    engine.answer_batch([image_question(), image_question("Which shape?")], [[random_image(2)], [random_image(2)]],
                        GenerationConfig(max_new_tokens=3))
    assert len(marked) > 3 and all(count == 1 for count in marked)
    assert background_compile._replies == 0
