"""The shipped default model (--model default): real answers about generated scenes and easy-VQA
test images, a multi-turn follow-up, and plain chat that survived the visual instruction tuning.

Thresholds sit below what benchmarks/default_model.py measured on the full sets (docs/model_card.md),
so a broken model, loader or prompt fails them."""

import json

import pytest

from assistant.weights.bundled_default import DEFAULT_MODEL_DIR
from assistant.inference.engine import ChatSession, Engine
from assistant.inference.generation import GenerationConfig
from assistant.inputs.images import load_image
from assistant.weights.loading import load_for_inference
from assistant.vqa.metrics import vqa_accuracy

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "vlm_config.json").is_file(),
                                 reason="no trained default model in this checkout")]
SHORT = "\nAnswer the question using a single word or phrase."
# Measured on the full sets (docs/model_card.md): easy-VQA test about 99%; held-out scenes colour
# and shape about 91.5% (with counting, its weakest skills). Chance is about 10-15%.
MIN_EASY_VQA_ACCURACY = 0.85
MIN_SCENE_ACCURACY = 0.65


@pytest.fixture(scope="module", params=["none", "int8"])
def engine(request):
    """Full precision, and the CPU fast path serve.py and the VQA command use by default."""
    model, processor, runtime = load_for_inference("default", quantize=request.param)
    assert model.config.trained
    return Engine(model, processor, runtime)


def ask(engine, items, root):
    convs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it["question"] + SHORT}]}]
             for it in items]
    images = [[load_image(root / it["image"])] for it in items]
    answers = engine.answer_batch(convs, images, GenerationConfig(max_new_tokens=8))
    return sum(vqa_accuracy(a, [it["answer"]]) for a, it in zip(answers, items)) / len(items), answers


def test_scene_questions(engine, tmp_path):
    from finetune.scenes import write_split

    write_split(tmp_path, "test", 12, seed=0)
    items = [json.loads(line) for line in (tmp_path / "test_questions.jsonl").read_text().splitlines()]
    colour_shape = [it for it in items if it["question_type"] in ("colour", "shape")][:24]
    accuracy, answers = ask(engine, colour_shape, tmp_path / "images")
    print("scenes colour/shape accuracy", accuracy, answers)
    assert accuracy >= MIN_SCENE_ACCURACY


def test_easy_vqa_test_images(engine):
    from assistant.vqa.easy_vqa import image_root, questions

    items = questions("test")[:32]
    accuracy, answers = ask(engine, items, image_root("test"))
    print("easy-VQA accuracy", accuracy, answers)
    assert accuracy >= MIN_EASY_VQA_ACCURACY


def test_multi_turn_and_plain_chat(engine):
    from pathlib import Path

    calls = engine.vision_calls
    session = ChatSession()
    session.add_user_message("What color is the diamond?" + SHORT,
                             [Path(__file__).parents[1] / "server" / "examples" / "scene1.png"])
    first = engine.chat(session, GenerationConfig(max_new_tokens=8))
    session.add_user_message("How many objects are there?" + SHORT)
    second = engine.chat(session, GenerationConfig(max_new_tokens=8))
    assert first and second and engine.vision_calls == calls + 1  # the follow-up re-encodes nothing
    chat = ChatSession()
    chat.add_user_message("What is the capital of France?")
    reply = engine.chat(chat, GenerationConfig(max_new_tokens=40))
    print(reply)
    assert "Paris" in reply and len(reply.split()) >= 3


def test_deferred_decode_compilation_waits_for_its_caller():
    """serve.py loads with compile_decode="deferred" and starts compiling once its server is built."""
    from assistant.cpu.policy import compiled_steps_run_fast

    if not compiled_steps_run_fast():
        pytest.skip("the compiled decode steps are only made where they were measured fast (AVX2 / AVX-512 x86)")
    _, _, runtime = load_for_inference("default", quantize="int8", compile_decode="deferred")
    decoder = runtime.decoder
    assert decoder._thread is None and not decoder.ready.is_set()  # nothing compiles until started
