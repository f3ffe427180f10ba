"""The vision tower: a transformers CLIP or SigLIP vision model, read at a chosen layer."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

TOWERS = {
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "siglip": (SiglipVisionConfig, SiglipVisionModel),
}


def build_vision_model(vision_config) -> nn.Module:
    """A vision model from a VisionConfig: pretrained weights when named, random ones otherwise."""
    if vision_config.model_type not in TOWERS:
        raise ValueError(f"unknown vision tower {vision_config.model_type!r}; known: {sorted(TOWERS)}")
    config_cls, model_cls = TOWERS[vision_config.model_type]
    if vision_config.pretrained:
        if Path(vision_config.pretrained).is_dir():
            from .llm import refuse_pickle_only

            refuse_pickle_only(Path(vision_config.pretrained))
        model = model_cls.from_pretrained(vision_config.pretrained, use_safetensors=True, trust_remote_code=False)
    else:
        config = dict(vision_config.config)
        for key in ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype"):
            config.pop(key, None)
        model = model_cls(config_cls(**config))
    vision_config.config = _config_dict(model.config)
    return model


def _config_dict(config) -> dict:
    d = config.to_dict()
    for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        d.pop(key, None)
    return d


class VisionTower(nn.Module):
    """Wraps the vision model; `forward` gives the patch features the projector reads."""

    def __init__(self, model: nn.Module, feature_layer: int = -2, drop_cls: bool = True):
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_patches(self) -> int:
        c = self.model.config
        return (c.image_size // c.patch_size) ** 2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(dtype=next(self.model.parameters()).dtype)
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        features = out.hidden_states[self.feature_layer]
        return features[:, 1:] if self.drop_cls else features
