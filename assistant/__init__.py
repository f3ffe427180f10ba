"""A LLaVA / BLIP-2-style vision-language assistant: CLIP ViT + projector + LLM.

    from assistant import load_model, Engine, ChatSession
    model, processor = load_model("default")
"""

from .model.config import ModelConfig, ProjectorConfig, VisionConfig
from .inference.engine import ChatSession, Engine
from .inference.generation import GenerationConfig
from .weights.loading import load_model

__all__ = ["ModelConfig", "ProjectorConfig", "VisionConfig", "ChatSession", "Engine", "GenerationConfig",
           "load_model"]
