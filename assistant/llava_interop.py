"""Both ways between our model and transformers' LlavaForConditionalGeneration (the llava-hf format
that transformers, vLLM and SGLang load)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

from .config import ModelConfig, ProjectorConfig, VisionConfig
from .model import VisionLanguageModel
from .processor import VLMProcessor
from .projectors.mlp import MLPProjector
from .vision import VisionTower, _config_dict


def is_llava_dir(path) -> bool:
    config = Path(path, "config.json")
    if not config.is_file():
        return False
    import json

    try:
        return json.loads(config.read_text()).get("model_type") == "llava"
    except json.JSONDecodeError:
        return False


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
    LlavaProcessor(
        image_processor=processor.image_processor, tokenizer=processor.tokenizer,
        patch_size=model.vision_tower.model.config.patch_size,
        vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
        image_token=processor.chat.image_token, num_additional_image_tokens=1 if cfg.vision.drop_cls else 0,
        chat_template=processor.tokenizer.chat_template,
    ).save_pretrained(directory)
    return directory


def load_llava(directory):
    """Load a llava-hf directory into our model: the same weights, the same logits."""
    directory = Path(directory)
    from .checkpoint import refuse_pickles

    refuse_pickles(directory)
    llava = LlavaForConditionalGeneration.from_pretrained(directory, use_safetensors=True, trust_remote_code=False,
                                                          dtype=torch.float32)
    lc = llava.config
    if lc.projector_hidden_act != "gelu" or not isinstance(lc.vision_feature_layer, int):
        raise ValueError(f"{directory}: only single-layer, GELU-projector LLaVA models are supported")
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    image_token = tokenizer.convert_ids_to_tokens(lc.image_token_index)
    vision_type = lc.vision_config.model_type.replace("_vision_model", "")
    config = ModelConfig(
        vision=VisionConfig(model_type=vision_type, config=_config_dict(lc.vision_config),
                            feature_layer=lc.vision_feature_layer,
                            drop_cls=lc.vision_feature_select_strategy == "default"),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        llm=str(directory), image_token=image_token, image_size=lc.vision_config.image_size,
        description=f"LLaVA model loaded from {directory}",
    )
    tower = VisionTower(llava.model.vision_tower, config.vision.feature_layer, config.vision.drop_cls)
    projector = MLPProjector(config.projector, tower.hidden_size, lc.text_config.hidden_size, tower.num_patches)
    projector.load_state_dict(llava.model.multi_modal_projector.state_dict())
    llm = AutoModelForCausalLM.from_config(lc.text_config, dtype=torch.float32)
    llm.model.load_state_dict(llava.model.language_model.state_dict())
    llm.lm_head.load_state_dict(llava.lm_head.state_dict())
    model = VisionLanguageModel(config, tower, projector, llm, lc.image_token_index).eval()
    image_processor = AutoImageProcessor.from_pretrained(directory)
    processor = VLMProcessor(image_processor, tokenizer, image_token, model.tokens_per_image)
    return model, processor

