"""Both ways between our model and transformers' LlavaForConditionalGeneration (the llava-hf format
that transformers, vLLM and SGLang load)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, \
    LlavaProcessor

from ..model.config import ModelConfig, ProjectorConfig, VisionConfig
from .llm import language_model_of
from ..model.vision_language_model import VisionLanguageModel
from ..inputs.processor import VLMProcessor
from ..model.projectors.mlp import MLPProjector
from ..model.vision import HAS_CLS, VisionTower, _config_dict


def hf_model_type(path) -> str | None:
    """The `model_type` of a transformers checkpoint directory (config.json), or None."""
    config = Path(path, "config.json")
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except json.JSONDecodeError:
        return None


def merged_llm(model: VisionLanguageModel):
    """The LLM with any LoRA adapter merged in (on a copy: the model itself is untouched)."""
    from peft import PeftModel

    if isinstance(model.llm, PeftModel):
        return copy.deepcopy(model.llm).merge_and_unload()
    return model.llm


def export_llava(model: VisionLanguageModel, processor: VLMProcessor, directory) -> Path:
    """Write a llava-hf directory. Needs a CLIP/SigLIP tower and an unpooled `mlp2x_gelu` projector."""
    cfg = model.config
    if cfg.projector.type != "mlp2x_gelu" or cfg.projector.pool_grid:
        raise ValueError(
            f"only an unpooled mlp2x_gelu projector maps onto LlavaForConditionalGeneration; this model has "
            f"{cfg.projector.type!r} (pool_grid={cfg.projector.pool_grid})"
        )
    directory = Path(directory)
    llm = merged_llm(model)
    image_token_id = processor.image_token_id
    vocab = llm.get_input_embeddings().weight.shape[0]
    if image_token_id >= vocab:
        # Llava embeds the image token before overwriting it, so it must exist: add zero rows
        # (a zero output row also keeps the exported model from ever predicting it... almost: logit 0).
        llm = copy.deepcopy(llm) if llm is model.llm else llm
        llm.resize_token_embeddings(image_token_id + 1, mean_resizing=False)
        with torch.no_grad():
            llm.get_input_embeddings().weight[vocab:] = 0
            if not llm.config.tie_word_embeddings:
                llm.get_output_embeddings().weight[vocab:] = 0
    text_config = copy.deepcopy(llm.config)
    llava_config = LlavaConfig(
        vision_config=copy.deepcopy(model.vision_tower.model.config),
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=model.tokens_per_image,
        vision_feature_layer=cfg.vision.feature_layer,
        vision_feature_select_strategy="default" if cfg.vision.drop_cls else "full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    llava = LlavaForConditionalGeneration(llava_config).to(model.dtype)
    llava.model.vision_tower.load_state_dict(model.vision_tower.model.state_dict())
    llava.model.multi_modal_projector.load_state_dict(model.projector.state_dict())
    llava.model.language_model.load_state_dict(llm.model.state_dict())
    llava.lm_head.load_state_dict(llm.lm_head.state_dict())
    llava.save_pretrained(directory, safe_serialization=True)
    # the template the model was trained with, in the typed form transformers' processors, vLLM and SGLang send
    has_cls = HAS_CLS[cfg.vision.model_type]
    LlavaProcessor(
        image_processor=processor.image_processor, tokenizer=processor.tokenizer,
        patch_size=model.vision_tower.model.config.patch_size,
        vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
        image_token=processor.chat.image_token, num_additional_image_tokens=int(has_cls),
        chat_template=processor.chat.chat_template,
    ).save_pretrained(directory)
    if getattr(llm, "generation_config", None) is not None:
        llm.generation_config.save_pretrained(directory)
    return directory


def load_llava(source: str):
    """Load a llava-hf checkpoint (a directory or hub id) into our model: the same weights, the same prompt (the
    checkpoint's own processor and chat template), the same logits."""
    llava = LlavaForConditionalGeneration.from_pretrained(source, use_safetensors=True, trust_remote_code=False,
                                                          dtype=torch.float32)
    lc = llava.config
    if lc.projector_hidden_act != "gelu" or not getattr(lc, "multimodal_projector_bias", True):
        raise ValueError(f"{source}: only LLaVA models with a two-layer GELU projector with biases are supported "
                         f"(this one: {lc.projector_hidden_act}, bias={lc.multimodal_projector_bias})")
    vision_type = lc.vision_config.model_type.replace("_vision_model", "")
    if vision_type not in HAS_CLS:
        raise ValueError(f"{source}: vision tower {lc.vision_config.model_type!r} is not supported (CLIP or SigLIP)")
    if lc.vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(f"{source}: unknown vision_feature_select_strategy {lc.vision_feature_select_strategy!r}")
    hf_processor = checkpoint_processor(source)
    config = ModelConfig(
        vision=VisionConfig(model_type=vision_type, config=_config_dict(lc.vision_config),
                            feature_layer=lc.vision_feature_layer,
                            drop_cls=lc.vision_feature_select_strategy == "default"),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        llm=str(source), image_token=hf_processor.tokenizer.convert_ids_to_tokens(lc.image_token_index),
        image_size=lc.vision_config.image_size, description=f"LLaVA model {source}",
    )
    tower = VisionTower(llava.model.vision_tower, config.vision.feature_layer, config.vision.drop_cls)
    projector = MLPProjector(config.projector, tower.hidden_size, lc.text_config.hidden_size, tower.num_positions)
    projector.load_state_dict(llava.model.multi_modal_projector.state_dict())
    model = VisionLanguageModel(config, tower, projector, language_model_of(llava), lc.image_token_index).eval()
    processor = VLMProcessor(hf_processor.image_processor, hf_processor.tokenizer, config.image_token,
                             model.tokens_per_image, chat_template=hf_processor.chat_template, source=str(source))
    return model, processor


def checkpoint_processor(source):
    """The checkpoint's own processor (image processor, tokenizer, chat template from wherever it is kept:
    chat_template.jinja, chat_template.json, processor or tokenizer config)."""
    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError, TypeError):
        processor = None
    if processor is None or not hasattr(processor, "image_processor"):
        processor = _Parts(AutoImageProcessor.from_pretrained(source), AutoTokenizer.from_pretrained(source))
    if getattr(processor, "chat_template", None) is None:
        processor.chat_template = processor.tokenizer.chat_template
    return processor


class _Parts:
    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer, self.chat_template = image_processor, tokenizer, None
