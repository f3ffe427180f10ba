"""The vision tower: a transformers CLIP, SigLIP or BLIP-2 vision model, read at a chosen layer."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from transformers import (Blip2VisionConfig, Blip2VisionModel, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig,
                          SiglipVisionModel)

TOWERS = {
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "siglip": (SiglipVisionConfig, SiglipVisionModel),
    "blip2": (Blip2VisionConfig, Blip2VisionModel),
}
# Towers whose sequence starts with a class token before the patches (SigLIP has none).
HAS_CLS = {"clip": True, "siglip": False, "blip2": True}


def build_vision_model(vision_config) -> nn.Module:
    """A vision model from a VisionConfig: pretrained weights when named, random ones otherwise."""
    if vision_config.model_type not in TOWERS:
        raise ValueError(f"unknown vision tower {vision_config.model_type!r}; known: {sorted(TOWERS)}")
    config_cls, model_cls = TOWERS[vision_config.model_type]
    if vision_config.pretrained:
        if Path(vision_config.pretrained).is_dir():
            from ..weights.llm import refuse_pickle_only

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
    """Wraps the vision model; `forward` gives the features the projector reads, as transformers' Llava and
    Blip2 read them: the hidden state of `feature_layer` (a list: those layers side by side; None: the last
    hidden state after the final layer norm), without the first position when `drop_cls` (Llava's "default"
    feature selection; "full" keeps it)."""

    def __init__(self, model: nn.Module, feature_layer: int | list[int] | None = -2, drop_cls: bool = True):
        super().__init__()
        self.model = model
        self.feature_layer = list(feature_layer) if isinstance(feature_layer, (list, tuple)) else feature_layer
        self.drop_cls = drop_cls

    @property
    def hidden_size(self) -> int:
        layers = len(self.feature_layer) if isinstance(self.feature_layer, list) else 1
        return self.model.config.hidden_size * layers

    @property
    def num_patches(self) -> int:
        c = self.model.config
        return (c.image_size // c.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Feature vectors per image: the patches, the class token where the tower has one, less any dropped."""
        has_cls = HAS_CLS.get(self.model.config.model_type.replace("_vision_model", ""), False)
        return self.num_patches + int(has_cls) - int(self.drop_cls)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(dtype=next(self.model.parameters()).dtype)
        if self.feature_layer is None:
            features = self.model(pixel_values=pixel_values).last_hidden_state
        else:
            out = self.model(pixel_values=pixel_values, output_hidden_states=True)
            layers = self.feature_layer if isinstance(self.feature_layer, list) else [self.feature_layer]
            features = torch.cat([out.hidden_states[k] for k in layers], dim=-1)
        return features[:, 1:] if self.drop_cls else features
