"""BLIP-2 checkpoints (transformers' Blip2ForConditionalGeneration with a decoder-only LLM, such as
Salesforce/blip2-opt-2.7b) in our model: the BLIP-2 vision model read at its last hidden state, its
Q-Former with query tokens and language projection as the projector, its LLM, its processor."""

from __future__ import annotations

import torch
from transformers import Blip2ForConditionalGeneration

from ..model.config import ModelConfig, ProjectorConfig, VisionConfig
from .llava import checkpoint_processor
from .llm import language_model_of
from ..model.vision_language_model import VisionLanguageModel
from ..inputs.processor import VLMProcessor
from ..model.projectors.qformer import QFormerProjector
from ..model.vision import VisionTower, _config_dict

# BLIP-2 was trained on "Question: {} Answer:" prompts and ships no chat template; turns follow one another in
# the same form. Images are not in the text: the processor puts their query positions before the prompt.
BLIP2_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set text = namespace(value='') -%}"
    "{%- if message['content'] is string -%}{%- set text.value = message['content'] -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ 'Question: ' + text.value + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Answer: ' + text.value + ' ' }}"
    "{%- else -%}{{ text.value + ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Answer:' }}{%- endif -%}"
)


def blip2_config(blip2_hf_config, source: str) -> ModelConfig:
    """Our ModelConfig for a transformers Blip2Config."""
    return ModelConfig(
        vision=VisionConfig(model_type="blip2", config=_config_dict(blip2_hf_config.vision_config), feature_layer=None,
                            drop_cls=False),
        projector=ProjectorConfig(type="qformer", num_queries=blip2_hf_config.num_query_tokens,
                                  qformer=_config_dict(blip2_hf_config.qformer_config)),
        llm=str(source), image_layout="prefix", image_size=blip2_hf_config.vision_config.image_size,
        description=f"BLIP-2 model {source}",
    )


def load_blip2(source: str):
    """Load a BLIP-2 checkpoint (a directory or hub id): the same weights, prompt and logits as transformers."""
    blip2 = Blip2ForConditionalGeneration.from_pretrained(source, use_safetensors=True, trust_remote_code=False,
                                                          dtype=torch.float32)
    bc = blip2.config
    if not bc.use_decoder_only_language_model:
        raise ValueError(f"{source}: BLIP-2 with an encoder-decoder LLM (Flan-T5) is not supported; use a "
                         "decoder-only one (OPT)")
    if bc.image_token_index is None:
        raise ValueError(f"{source}: this BLIP-2 checkpoint predates image tokens (no image_token_index in its "
                         "config); use a checkpoint saved by transformers 4.47 or later")
    hf_processor = checkpoint_processor(source)
    config = blip2_config(bc, source)
    config.image_token = hf_processor.tokenizer.convert_ids_to_tokens(bc.image_token_index)
    tower = VisionTower(blip2.vision_model, feature_layer=None, drop_cls=False)
    projector = QFormerProjector(config.projector, tower.hidden_size, bc.text_config.hidden_size, tower.num_positions)
    projector.query_tokens = blip2.query_tokens
    projector.qformer = blip2.qformer
    projector.language_projection = blip2.language_projection
    model = VisionLanguageModel(config, tower, projector, language_model_of(blip2), bc.image_token_index).eval()
    processor = VLMProcessor(hf_processor.image_processor, hf_processor.tokenizer, config.image_token,
                             model.tokens_per_image, chat_template=hf_processor.chat_template or BLIP2_CHAT_TEMPLATE,
                             image_layout="prefix", source=str(source))
    return model, processor
