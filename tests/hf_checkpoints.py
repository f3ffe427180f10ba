"""Tiny random checkpoints made by transformers' own classes and processors, saved with save_pretrained, as a
user would download them: llava-hf style (CLIP + Llama, SigLIP + Qwen2) and BLIP-2 (Q-Former + OPT)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                          BlipImageProcessor, CLIPImageProcessor, CLIPVisionConfig, GenerationConfig, LlamaConfig,
                          LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, OPTConfig, Qwen2Config,
                          SiglipImageProcessor, SiglipVisionConfig)

from assistant.weights.llm import resolve_llm_dir

# llava-hf/llava-1.5-7b-hf's chat template (typed parts; images first, then text; `generation` marks replies).
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-interleave-qwen-0.5b-hf style: ChatML with typed parts.
CHATML_TYPED_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def tokenizer(bos: bool):
    """A real BPE tokenizer (SmolLM2's, offline), with a BOS the tokenizer prepends when `bos` (as llava-1.5's
    Llama tokenizer and OPT's do), and `<image>` as a special token."""
    kwargs = dict(add_bos_token=True, bos_token="<|endoftext|>") if bos else {}
    tok = AutoTokenizer.from_pretrained(resolve_llm_dir("smollm2-135m-instruct"), **kwargs)
    tok.chat_template = None
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    tok.pad_token = tok.eos_token
    return tok


def _text_kwargs(tok, **extra):
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)


def _seeded_init(model, seed: int, std: float = 0.2):
    """Weights large enough that greedy answers depend on the input (the usual 0.02 repeats one token)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return model.eval()


def llava_clip_llama(directory: Path, strategy: str = "default", feature_layer=-2) -> Path:
    """CLIP + Llama, a BOS tokenizer, llava-1.5's template; CLIP's processor resizes the shortest edge and
    centre-crops (a non-square image loses its sides)."""
    tok = tokenizer(bos=True)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**_text_kwargs(tok, num_key_value_heads=2)),
                         image_token_index=image_token_id, vision_feature_layer=feature_layer,
                         vision_feature_select_strategy=strategy, image_seq_length=16 + (strategy == "full"))
    model = _seeded_init(LlavaForConditionalGeneration(config), 1)
    model.save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                   vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
                   chat_template=LLAVA_15_TEMPLATE).save_pretrained(directory)
    return Path(directory)


def llava_siglip_qwen2(directory: Path, template_in: str = "jinja") -> Path:
    """SigLIP + Qwen2 (q/k/v biases, tied embeddings), a ChatML typed template, two end tokens in
    generation_config.json. `template_in`: "jinja" (chat_template.jinja) or "json" (only chat_template.json, the
    processor file many hub repos carry)."""
    tok = tokenizer(bos=False)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4)
    text = Qwen2Config(**_text_kwargs(tok, num_key_value_heads=2, tie_word_embeddings=True))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="full", image_seq_length=16,
                         tie_word_embeddings=True)
    model = _seeded_init(LlavaForConditionalGeneration(config), 2)
    model.generation_config = GenerationConfig(eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"),
                                                             tok.convert_tokens_to_ids("<|endoftext|>")],
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(directory)
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8, vision_feature_select_strategy="full",
                   num_additional_image_tokens=0, chat_template=CHATML_TYPED_TEMPLATE).save_pretrained(directory)
    if template_in == "json":
        directory = Path(directory)
        (directory / "chat_template.jinja").unlink()
        (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHATML_TYPED_TEMPLATE}))
        for name in ("processor_config.json", "tokenizer_config.json"):
            path = directory / name
            if path.is_file():
                data = json.loads(path.read_text())
                data.pop("chat_template", None)
                path.write_text(json.dumps(data))
    return Path(directory)


def blip2_opt(directory: Path) -> Path:
    """BLIP-2: its vision model, a Q-Former with 4 query tokens, OPT (BOS-prepending tokenizer)."""
    tok = tokenizer(bos=True)
    text = OPTConfig(vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=512, word_embed_proj_dim=64, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = Blip2Config(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=32, vocab_size=100),
        text_config=text.to_dict(), num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = _seeded_init(Blip2ForConditionalGeneration(config), 3)
    model.save_pretrained(directory)
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                   num_query_tokens=4).save_pretrained(directory)
    return Path(directory)
