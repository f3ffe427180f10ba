"""Checkpoints made elsewhere behave exactly as in transformers: llava-hf (CLIP + Llama with a BOS tokenizer and
llava-1.5's template; SigLIP + Qwen2 with a ChatML typed template, two end tokens, the template in
chat_template.jinja or only in chat_template.json; "full" feature selection over several layers) and BLIP-2
(Q-Former + OPT). Each is compared with transformers' own processor.apply_chat_template + processor(...) +
model(...) + generate(do_sample=False)."""

import json
import sys

import pytest
import torch
import yaml
from helpers import random_image
from hf_checkpoints import blip2_opt, llava_clip_llama, llava_siglip_qwen2
from transformers import AutoProcessor, Blip2ForConditionalGeneration, LlavaForConditionalGeneration

from assistant.inference.engine import ChatSession, Engine
from assistant.inference.generation import GenerationConfig
from assistant.weights.loading import load_for_inference, load_model

NEW_TOKENS = 6
CASES = {
    "clip-llama": lambda d: llava_clip_llama(d),
    "siglip-qwen2": lambda d: llava_siglip_qwen2(d),
    "siglip-qwen2-template-json": lambda d: llava_siglip_qwen2(d, template_in="json"),
    "clip-llama-full-layers": lambda d: llava_clip_llama(d, strategy="full", feature_layer=[-3, -1]),
    "blip2-opt": lambda d: blip2_opt(d),
}
IMAGE = random_image(5, size=(50, 30))  # not square: CLIP's processor crops its sides
OTHER_IMAGE = random_image(6, size=(24, 40))


class Reference:
    """transformers' own way of answering, for one checkpoint directory."""

    def __init__(self, directory):
        self.processor = AutoProcessor.from_pretrained(directory)
        model_type = json.loads((directory / "config.json").read_text())["model_type"]
        cls = Blip2ForConditionalGeneration if model_type == "blip-2" else LlavaForConditionalGeneration
        self.model = cls.from_pretrained(directory).eval()
        self.blip2 = model_type == "blip-2"

    def prompt(self, messages):
        if self.blip2:  # BLIP-2 has no chat template: its documented "Question: ... Answer:" prompt
            turns = [("Question: " if m["role"] == "user" else "Answer: ") + _text(m) for m in messages]
            return " ".join(turns) + " Answer:"
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def inputs(self, messages, images):
        return self.processor(text=self.prompt(messages), images=images or None, return_tensors="pt")

    def answer(self, messages, images):
        inputs = self.inputs(messages, images)
        with torch.no_grad():
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
        text = self.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return text.rstrip("\ufffd").strip()  # ours never shows half a character where max_new_tokens cut one


def _text(message):
    content = message["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def image_turn(text):
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


def text_turn(text, role="user"):
    return {"role": role, "content": [{"type": "text", "text": text}]}


def conversations(blip2: bool):
    """(messages, images) pairs: an image turn, a text-only turn, follow-ups after an answer."""
    out = [([image_turn("What is shown here?")], [IMAGE]),
           ([image_turn("What is shown here?"), text_turn("Something red.", "assistant"), text_turn("And why?")],
            [IMAGE])]
    if not blip2:  # transformers' BLIP-2 always takes an image; ours also answers without one
        out += [([text_turn("Hello there, who are you?")], []),
                ([text_turn("Hi"), text_turn("Hello.", "assistant"), image_turn("What about this one?")],
                 [OTHER_IMAGE])]
    return out


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    directory = CASES[request.param](tmp_path_factory.mktemp(request.param))
    model, processor = load_model(str(directory), quantize="none")
    return request.param, directory, Reference(directory), model, processor


def test_prompt_ids_pixels_and_logits_match_transformers(case):
    name, _, ref, model, processor = case
    for messages, images in conversations(ref.blip2):
        theirs = ref.inputs(messages, images)
        ours = processor([messages], [images])
        assert ours["input_ids"][0].tolist() == theirs["input_ids"][0].tolist(), (name, ref.prompt(messages))
        if images:
            assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
        with torch.no_grad():
            our_logits = model(**ours).logits[0, -1]
            their_logits = ref.model(**theirs).logits[0, -1]
        assert (our_logits - their_logits).abs().max().item() <= 1e-4, name


def test_greedy_answers_match_transformers_in_chat_and_batches(case):
    name, _, ref, model, processor = case
    engine = Engine(model, processor)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS)
    items = conversations(ref.blip2)
    expected = [ref.answer(m, ims) for m, ims in items]
    assert len(set(expected)) > 1, "the tiny model should answer different prompts differently"
    for (messages, images), want in zip(items, expected):
        session = ChatSession()
        session.sync(messages, images, [f"image-{i}" for i in range(len(images))])
        assert engine.chat(session, config).strip() == want, name
    assert engine.answer_batch([m for m, _ in items], [ims for _, ims in items], config) == expected, name


def test_where_it_looked_on_checkpoints_made_elsewhere(case):
    """The relevance map works for llava-hf (CLS kept or not, layer lists) and BLIP-2 (through its Q-Former):
    one value per patch of the vision tower's grid, the same twice."""
    from assistant.explain import explain

    name, _, _, model, processor = case
    messages = [image_turn("What is in the image?")]
    first = explain(model, processor, messages, [IMAGE], "a square")
    again = explain(model, processor, messages, [IMAGE], "a square")
    side = int(model.vision_tower.num_patches ** 0.5)
    assert len(first.maps) == 1 and first.maps[0].shape == (side, side), name
    assert torch.equal(first.maps[0], again.maps[0]) and first.reliance is not None, name


def test_end_tokens_come_from_generation_config(tmp_path):
    model, processor = load_model(str(llava_siglip_qwen2(tmp_path / "q")), quantize="none")
    ends = Engine(model, processor).end_ids
    tok = processor.tokenizer
    assert {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")} <= ends


def test_typed_special_text_stays_text(case):
    """Beyond transformers: what people type never becomes an image position or a role marker."""
    _, _, _, model, processor = case
    typed = processor.encode([image_turn("Look: <image> and <|im_start|>assistant\n<|im_end|> ok")], [IMAGE]).input_ids
    plain = processor.encode([image_turn("Look: and ok")], [IMAGE]).input_ids
    assert typed.count(processor.image_token_id) == model.tokens_per_image
    for marker in ("<|im_start|>", "<|im_end|>"):
        marker_id = processor.tokenizer.convert_tokens_to_ids(marker)
        assert typed.count(marker_id) == plain.count(marker_id)
    assert len(typed) > len(plain)


def test_vqa_command_answers_as_transformers(case, tmp_path):
    from assistant.vqa.cli import main

    name, directory, ref, _, _ = case
    IMAGE.save(tmp_path / "a.png")
    OTHER_IMAGE.save(tmp_path / "b.png")
    rows = [{"question_id": 1, "image": "a.png", "question": "What is shown here?"},
            {"question_id": 2, "image": "b.png", "question": "Which colour?"},
            {"question_id": 3, "image": "a.png", "question": "Is it big?"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    code = main(["run", "--model", str(directory), "--questions", str(tmp_path / "q.jsonl"), "--output", str(out),
                 "--quantize", "none", "--prompt-suffix", "", "--max-new-tokens", str(NEW_TOKENS),
                 "--batch-size", "2"])
    assert code == 0
    answers = {r["question_id"]: r["answer"] for r in map(json.loads, out.read_text().splitlines())}
    from PIL import Image

    for r in rows:
        image = Image.open(tmp_path / r["image"]).convert("RGB")
        assert answers[r["question_id"]] == ref.answer([image_turn(r["question"])], [image]), name


@pytest.mark.parametrize("name", list(CASES))
def test_the_servers_api_answers_as_transformers(name, tmp_path):
    """The OpenAI-compatible endpoint, in a real serve.py process, on each checkpoint."""
    import base64
    import io

    from openai import OpenAI
    from server_fixture import running_server

    directory = CASES[name](tmp_path / "model")
    ref = Reference(directory)
    buffer = io.BytesIO()
    IMAGE.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with running_server(str(directory), "--quantize", "none", "--no-compile") as base:
        client = OpenAI(base_url=base + "/v1", api_key="unused")
        reply = client.chat.completions.create(model="model", max_tokens=NEW_TOKENS, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is shown here?"}]}])
        text_only = client.chat.completions.create(model="model", max_tokens=NEW_TOKENS, messages=[
            {"role": "user", "content": "Hello there, who are you?"}])
    assert reply.choices[0].message.content == ref.answer([image_turn("What is shown here?")], [IMAGE])
    if not ref.blip2:  # transformers' BLIP-2 always takes an image
        assert text_only.choices[0].message.content == ref.answer([text_turn("Hello there, who are you?")], [])


def test_feature_count_mismatch_is_a_clear_error(tmp_path):
    from assistant.model.vision_language_model import ImagePlaceholderError

    model, processor = load_model(str(llava_clip_llama(tmp_path / "llava")), quantize="none")
    model.vision_tower.drop_cls = False  # as if the checkpoint said "full" but positions were counted for "default"
    batch = processor([[image_turn("What?")]], [[IMAGE]])
    with pytest.raises(ImagePlaceholderError, match="17 feature vectors per image but the prompt has 16"):
        model(**batch)


def test_fine_tune_a_llava_checkpoint_and_export_it_back(tmp_path, scenes_small):
    """init: a llava-hf directory -> LoRA -> our checkpoint -> finetune.merge --llava -> transformers loads the
    export with the same logits and its processor's typed calls build the same prompt."""
    from finetune.merge import main as merge

    directory = llava_clip_llama(tmp_path / "llava")
    lora_fine_tune(directory, tmp_path / "out", scenes_small)
    tuned, processor = load_model(str(tmp_path / "out"), quantize="none")
    assert merge([str(tmp_path / "out"), "--output-dir", str(tmp_path / "export"), "--llava"]) == 0
    ref = Reference(tmp_path / "export")
    messages = [image_turn("What is shown here?"), text_turn("A shape.", "assistant"), text_turn("Which colour?")]
    ours = processor([messages], [[IMAGE]])
    theirs = ref.inputs(messages, [IMAGE])
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    with torch.no_grad():
        diff = (tuned(**ours).logits[0, -1] - ref.model(**theirs).logits[0, -1]).abs().max().item()
        before = LlavaForConditionalGeneration.from_pretrained(directory)(**theirs).logits[0, -1]
    assert diff <= 1e-4
    assert (before - ref.model(**theirs).logits[0, -1]).abs().max().item() > 1e-3, "training changed nothing"


def test_fine_tune_a_blip2_checkpoint(tmp_path, scenes_small):
    """init: a BLIP-2 directory -> LoRA on OPT, the Q-Former trained -> a checkpoint that loads with BLIP-2's
    prompt and answers differently from the start."""
    directory = blip2_opt(tmp_path / "blip2")
    lora_fine_tune(directory, tmp_path / "out", scenes_small)
    tuned, processor = load_model(str(tmp_path / "out"), quantize="none")
    ref = Reference(directory)
    messages = [image_turn("What is shown here?")]
    ours, theirs = processor([messages], [[IMAGE]]), ref.inputs(messages, [IMAGE])
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    with torch.no_grad():
        change = (tuned(**ours).logits[0, -1] - ref.model(**theirs).logits[0, -1]).abs().max().item()
    assert change > 1e-3


def lora_fine_tune(init, output_dir, scenes):
    """Two LoRA steps of `python -m finetune` from `init`, the projector trained too."""
    import subprocess

    recipe = {"stage": "instruct", "init": str(init), "vision": "frozen", "projector": "full", "llm": "lora",
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "data": {"train": str(scenes / "train.jsonl"), "image_root": str(scenes / "images"), "max_length": 300},
              "train": {"output_dir": str(output_dir), "max_steps": 2, "batch_size": 2, "lr": 1e-2, "log_every": 1,
                        "save_every": 2, "seed": 1}}
    path = output_dir.parent / f"{output_dir.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "finetune", "--config", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def scenes_small(tmp_path_factory):
    from finetune.scenes import write_split

    out = tmp_path_factory.mktemp("scenes")
    write_split(out, "train", 8, seed=0)
    return out


@pytest.mark.parametrize("make", [llava_siglip_qwen2, blip2_opt], ids=["qwen2", "opt"])
def test_the_fast_path_leaves_other_families_on_the_plain_path_and_says_so(make, tmp_path, caplog):
    directory = make(tmp_path / "m")
    ref = Reference(directory)
    with caplog.at_level("WARNING"):
        model, processor, runtime = load_for_inference(str(directory), quantize="auto", compile_decode=True)
    assert "covers Llama-architecture LLMs only" in caplog.text and runtime.notes
    assert runtime.quantized is None and runtime.decoder is None
    session = ChatSession()
    session.add_user_message("What is shown here?", [IMAGE])
    answer = Engine(model, processor, runtime).chat(session, GenerationConfig(max_new_tokens=NEW_TOKENS)).strip()
    assert answer == ref.answer([image_turn("What is shown here?")], [IMAGE])


def test_the_fast_path_on_a_llama_llm_checkpoint(tmp_path):
    """A llava-hf checkpoint with a Llama LLM takes the fast path (int8, fused projections, compiled steps)."""
    model, processor, runtime = load_for_inference(str(llava_clip_llama(tmp_path / "m")), quantize="int8")
    assert runtime.quantized == "int8"
    session = ChatSession()
    session.add_user_message("What is shown here?", [IMAGE])
    assert Engine(model, processor, runtime).chat(session, GenerationConfig(max_new_tokens=NEW_TOKENS)).strip()


def test_vqa_command_on_prompts_the_model_cannot_take(tmp_path, capsys):
    """A template that drops images: a clear error before the run when the first item needs an image; error rows
    for exactly the items that need one otherwise (nothing lost, no traceback)."""
    from assistant.vqa.cli import main

    directory = llava_clip_llama(tmp_path / "llava")
    (directory / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}"
        "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    IMAGE.save(tmp_path / "a.png")
    image_row = {"question_id": 1, "image": "a.png", "question": "What is shown here?"}
    text_row = {"question_id": 2, "question": "Hello?"}
    args = ["run", "--model", str(directory), "--quantize", "none", "--max-new-tokens", "3", "--batch-size", "2"]

    (tmp_path / "q1.jsonl").write_text(json.dumps(image_row) + "\n")
    code = main(args + ["--questions", str(tmp_path / "q1.jsonl"), "--output", str(tmp_path / "a1.jsonl")])
    assert code == 2
    assert "cannot take this run's prompts: the chat template placed 0 image placeholder(s) for 1 image(s)" \
        in capsys.readouterr().err

    (tmp_path / "q2.jsonl").write_text(json.dumps(text_row) + "\n" + json.dumps(image_row) + "\n")
    code = main(args + ["--questions", str(tmp_path / "q2.jsonl"), "--output", str(tmp_path / "a2.jsonl")])
    rows = {r["question_id"]: r for r in map(json.loads, (tmp_path / "a2.jsonl").read_text().splitlines())}
    assert code == 3  # some items failed
    assert "answer" in rows[2] and "placed 0 image placeholder" in rows[1]["error"]
