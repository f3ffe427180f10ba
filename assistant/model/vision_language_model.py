"""The vision-language model: vision tower -> projector -> LLM.

This is where image features enter the LLM: `embed` writes the projector's output into the
positions of the `<image>` tokens (as transformers' Llava does with masked_scatter), and the LLM
reads the result as ordinary input embeddings.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..inputs.chat_format import IGNORE_INDEX

from .config import ModelConfig
from .vision import VisionTower


def base_llm(llm: nn.Module) -> nn.Module:
    """The LLM itself, under a peft adapter's wrapper if it has one."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


class ImagePlaceholderError(ValueError):
    """The number of image positions in the text does not match the images given."""


class VisionLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, vision_tower: VisionTower, projector: nn.Module, llm: nn.Module,
                 image_token_id: int):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.projector = projector
        self.llm = llm
        self.image_token_id = image_token_id
        if config.vision.frozen:
            self.vision_tower.requires_grad_(False)

    @property
    def tokens_per_image(self) -> int:
        return self.projector.num_tokens

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.vision.frozen:
            self.vision_tower.eval()  # a frozen tower keeps eval behaviour (no dropout) while training
        return self

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) -> (images, tokens_per_image, llm_hidden)."""
        pixel_values = pixel_values.to(self.vision_tower.model.device)
        if self.config.vision.frozen:
            with torch.no_grad():
                features = self.vision_tower(pixel_values)
        else:
            features = self.vision_tower(pixel_values)
        projector_dtype = next(self.projector.parameters()).dtype
        return self.projector(features.to(projector_dtype)).to(self.device, self.dtype)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each image's features written over its `<image>` positions."""
        input_ids = input_ids.to(self.device)
        is_image = input_ids == self.image_token_id
        n_positions = int(is_image.sum())
        n_images = 0 if image_features is None else image_features.shape[0]
        expected = n_images * self.tokens_per_image
        if n_positions != expected:
            raise ImagePlaceholderError(
                f"the text has {n_positions} image positions ({n_positions / self.tokens_per_image:g} image "
                f"placeholders of {self.tokens_per_image} tokens) but {n_images} image(s) were given"
            )
        # The image token may lie outside the LLM's vocabulary (we never resize it): embed a safe id.
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        if n_images and image_features.shape[1] != self.tokens_per_image:
            raise ImagePlaceholderError(
                f"the vision tower and projector give {image_features.shape[1]} feature vectors per image but the "
                f"prompt has {self.tokens_per_image} positions for each (check the feature selection: a class "
                "token kept or dropped)"
            )
        if n_images:
            features = image_features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), features)
        return embeds

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_features=None, labels=None,
                **llm_kwargs):
        if image_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.encode_images(pixel_values)
        inputs_embeds = self.embed(input_ids, image_features)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if labels is not None and not llm_kwargs:
            return self._loss_on_labels_only(inputs_embeds, attention_mask, labels.to(self.device))
        if labels is not None:
            labels = labels.to(self.device)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **llm_kwargs)

    def _loss_on_labels_only(self, inputs_embeds, attention_mask, labels):
        """Training loss with the LM head applied only where there is a label.

        Only assistant replies are labelled (about a tenth of the positions), and the LM head is a
        fifth of a small LLM's compute: skipping it elsewhere makes training steps markedly faster.
        The loss equals the LLM's own (mean cross-entropy over labelled tokens)."""
        llm = base_llm(self.llm)
        hidden = llm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = llm.get_output_embeddings()(hidden[:, :-1][keep]).float()
        if logits.shape[0] == 0:  # nothing to learn in this batch (all replies truncated away)
            loss = logits.sum() * 0.0 + inputs_embeds.sum() * 0.0
        else:
            loss = F.cross_entropy(logits, targets[keep])
        return CausalLMOutputWithPast(loss=loss, logits=None)
