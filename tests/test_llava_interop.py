"""Export to transformers' LlavaForConditionalGeneration and back: the same logits."""

import torch
from helpers import image_question, random_image, tiny_config
from peft import LoraConfig, get_peft_model
from transformers import AutoProcessor, LlavaForConditionalGeneration

from assistant.model.builder import build_model
from assistant.weights.llava import export_llava
from assistant.weights.loading import load_model


def test_export_then_transformers_loads_it_with_the_same_logits(tiny_llm_dir, tmp_path):
    torch.manual_seed(3)
    model, processor = build_model(tiny_config(tiny_llm_dir))
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.eval()
    export_llava(model, processor, tmp_path / "llava")
    image = random_image(7, size=(50, 30))
    batch = processor([image_question()], [[image]])
    with torch.no_grad():
        ours = model(**batch).logits
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    with torch.no_grad():
        theirs = llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits
    vocab = ours.shape[-1]
    diff = (ours - theirs[..., :vocab]).abs().max().item()
    print(f"export: max abs logit difference {diff:.2e}")
    assert diff <= 1e-4
    # transformers' own LlavaProcessor, from the exported directory, builds the same inputs from the typed parts
    # that its processors, vLLM and SGLang send (and from plain strings, as the template was written for)
    hf_processor = AutoProcessor.from_pretrained(tmp_path / "llava")
    for messages in (image_question(), [{"role": "user", "content": "<image>\nWhat colour is the square?"}]):
        prompt = hf_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        hf_inputs = hf_processor(images=[image], text=prompt, return_tensors="pt")
        assert hf_inputs["input_ids"].tolist() == batch["input_ids"].tolist()
        assert torch.allclose(hf_inputs["pixel_values"], batch["pixel_values"], atol=1e-6)
    follow_up = image_question() + [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
                                    {"role": "user", "content": [{"type": "text", "text": "And the circle?"}]}]
    prompt = hf_processor.apply_chat_template(follow_up, add_generation_prompt=True, tokenize=False)
    assert hf_processor(images=[image], text=prompt)["input_ids"][0] == processor.encode(follow_up, [image]).input_ids

    # and a llava-hf directory loads into our engine with the same logits
    reloaded, processor2 = load_model(str(tmp_path / "llava"))
    with torch.no_grad():
        again = reloaded(**processor2([image_question()], [[image]])).logits
    diff2 = (again[..., :vocab] - theirs[..., :vocab]).abs().max().item()
    print(f"llava-hf -> ours: max abs logit difference {diff2:.2e}")
    assert diff2 <= 1e-4
