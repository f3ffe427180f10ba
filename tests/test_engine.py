"""Chat sessions: cached KV and image features, follow-ups, context overflow."""

import pytest
import torch
from helpers import random_image, tiny_config

from assistant.model.builder import build_model
from assistant.inputs.chat_format import ConversationError
from assistant.inference.engine import ChatSession, Engine
from assistant.inference.generation import GenerationConfig


@pytest.fixture
def engine(tiny_llm_dir):
    torch.manual_seed(0)
    model, processor = build_model(tiny_config(tiny_llm_dir))
    return Engine(model, processor)


def test_follow_up_reuses_image_features_and_cache(engine):
    cfg = GenerationConfig(max_new_tokens=6)
    session = ChatSession()
    session.add_user_message("What is this?", [random_image(1)])
    first = engine.chat(session, cfg)
    assert engine.vision_calls == 1
    cached = len(session.cached_keys)
    assert cached > engine.model.tokens_per_image
    session.add_user_message("And the colour?")
    second = engine.chat(session, cfg)
    assert engine.vision_calls == 1, "a follow-up must not re-encode the image"
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    # A second image in a later turn is encoded alone.
    session.add_user_message("Compare with this one.", [random_image(2)])
    engine.chat(session, cfg)
    assert engine.vision_calls == 2
    assert isinstance(first, str) and isinstance(second, str)


def test_cached_turn_equals_fresh_computation(engine):
    """Prefix caching must not change answers: a follow-up through the cache = a fresh session."""
    cfg = GenerationConfig(max_new_tokens=6)
    a = ChatSession()
    a.add_user_message("Describe.", [random_image(3)])
    engine.chat(a, cfg)
    a.add_user_message("More?")
    cached_answer = engine.chat(a, cfg)
    b = ChatSession(messages=[dict(m) for m in a.messages[:3]], images=list(a.images), image_ids=[999])
    fresh_answer = engine.chat(b, cfg)
    assert cached_answer == fresh_answer


def test_context_overflow_drops_oldest_turns_with_notice(engine):
    engine.context_length = 160
    cfg = GenerationConfig(max_new_tokens=4)
    session = ChatSession()
    for i in range(6):
        session.add_user_message(f"question number {i} " + "word " * 12, [random_image(i)] if i == 0 else [])
        engine.chat(session, cfg)
    assert session.notices and "oldest turn was dropped" in session.notices[0]
    assert session.messages[0]["role"] == "user"
    assert not session.images  # the first turn's image went with it
    session.add_user_message("x " * 500)
    with pytest.raises(ConversationError, match="too long"):
        engine.chat(session, cfg)


def test_empty_message_is_refused():
    with pytest.raises(ConversationError, match="empty message"):
        ChatSession().add_user_message("", [])


def test_stop_during_stream_keeps_partial_reply(engine):
    session = ChatSession()
    session.add_user_message("Tell me a story.")
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] >= 3

    list(engine.stream_chat(session, GenerationConfig(max_new_tokens=50), should_stop=stop))
    assert session.messages[-1]["role"] == "assistant"
    assert calls["n"] == 3
