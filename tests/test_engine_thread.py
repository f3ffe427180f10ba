"""server/engine_thread.py: the server's one model thread gives the engine's replies, stops a reply whose
stream is closed, keeps serving after that and after a failed reply, and reports a failed load."""

import pytest

from assistant.model.builder import build_model
from assistant.inference.engine import ChatSession, Engine
from assistant.inference.generation import GenerationConfig
from helpers import random_image, tiny_config
from server.engine_thread import EngineThread


@pytest.fixture(scope="module")
def engine_thread(tiny_llm_dir):
    def load():
        model, processor = build_model(tiny_config(tiny_llm_dir))
        return Engine(model.eval(), processor)

    return EngineThread(load)


def ask(text="What is in the image?"):
    session = ChatSession()
    session.add_user_message(text, [random_image(2)])
    return session


def test_replies_are_the_engines_and_computed_on_the_engine_thread(engine_thread):
    config = GenerationConfig(max_new_tokens=10)
    direct = "".join(engine_thread.engine.stream_chat(ask(), config))
    assert "".join(engine_thread.stream_chat(ask(), config)) == direct


def test_closing_a_stream_stops_its_generation_and_the_thread_keeps_serving(engine_thread):
    session = ask()
    stream = engine_thread.stream_chat(session, GenerationConfig(max_new_tokens=200))
    next(stream)
    stream.close()
    follow = ask()
    "".join(engine_thread.stream_chat(follow, GenerationConfig(max_new_tokens=4)))  # runs after the stopped one
    assert session.usage["completion_tokens"] < 200 and session.messages[-1]["role"] == "assistant"
    assert follow.usage["completion_tokens"] <= 4


def test_a_failed_reply_raises_on_the_caller_and_the_thread_keeps_serving(engine_thread):
    broken = ChatSession()  # an image placeholder without its image
    broken.messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]})
    with pytest.raises(ValueError):  # ConversationError / ImagePlaceholderError, raised where the caller reads
        "".join(engine_thread.stream_chat(broken, GenerationConfig(max_new_tokens=4)))
    assert "".join(engine_thread.stream_chat(ask(), GenerationConfig(max_new_tokens=4))) is not None


def test_a_failed_load_is_raised_by_the_constructor():
    def load():
        raise FileNotFoundError("no such model")

    with pytest.raises(FileNotFoundError, match="no such model"):
        EngineThread(load)


def test_a_reply_is_marked_as_replying_as_a_whole(engine_thread):
    """The engine marks each step of a reply, the thread the whole reply: a compile that yields to replies
    (serve.py's, background_compile.py) does not wake between its tokens."""
    from assistant.cpu import background_compile

    seen = []

    def stop():
        seen.append(background_compile._replies)
        return False

    "".join(engine_thread.stream_chat(ask(), GenerationConfig(max_new_tokens=6), should_stop=stop))
    assert seen and set(seen) == {2}  # the reply's own mark and its step's
    assert background_compile._replies == 0
