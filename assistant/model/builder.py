"""Building a model from its parts: the one place that composes vision tower, projector and LLM."""

from __future__ import annotations

from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from .config import ModelConfig
from ..weights.llm import load_llm
from .vision_language_model import VisionLanguageModel
from ..inputs.processor import VLMProcessor
from .projectors import build_projector
from .vision import VisionTower, build_vision_model


def make_image_processor(config: ModelConfig):
    """transformers' LLaVA image processor: pad to square with the mean colour (never crop), resize."""
    return LlavaImageProcessorPil(
        do_pad=True, do_center_crop=False, size={"height": config.image_size, "width": config.image_size},
        image_mean=list(config.image_mean), image_std=list(config.image_std),
    )


def add_image_token(tokenizer, image_token: str) -> int:
    """Register the image placeholder as one special token (the LLM's embeddings are not resized:
    the model never embeds this id, it writes image features there instead)."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(image_token)


def build_model(config: ModelConfig, *, llm=None, tokenizer=None, image_processor=None, quantize=None,
                device_map=None, chat_template: str | None = None):
    """A model with the LLM from `config.llm` (or the one given), and fresh or pretrained vision weights."""
    if llm is None:
        llm, tokenizer = load_llm(config.llm, quantize=quantize, device_map=device_map)
    vision_model = build_vision_model(config.vision)
    tower = VisionTower(vision_model, config.vision.feature_layer, config.vision.drop_cls)
    llm_hidden = llm.get_input_embeddings().weight.shape[-1]
    projector = build_projector(config.projector, tower.hidden_size, llm_hidden, tower.num_positions)
    image_token_id = add_image_token(tokenizer, config.image_token)
    model = VisionLanguageModel(config, tower, projector, llm, image_token_id)
    model.vision_tower.to(model.device)
    model.projector.to(model.device)
    processor = VLMProcessor(image_processor or make_image_processor(config), tokenizer, config.image_token,
                             model.tokens_per_image, chat_template=chat_template, image_layout=config.image_layout,
                             source=config.llm)
    return model, processor
