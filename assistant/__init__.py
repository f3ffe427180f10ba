"""A LLaVA / BLIP-2-style vision-language assistant: CLIP ViT + projector + LLM.

    from assistant import load_model, Engine, ChatSession
    model, processor = load_model("default")
"""

from .config import ModelConfig, ProjectorConfig, VisionConfig
from .engine import ChatSession, Engine
from .generation import GenerationConfig
from .loading import load_model

__all__ = ["ModelConfig", "ProjectorConfig", "VisionConfig", "ChatSession", "Engine", "GenerationConfig",
           "load_model"]
