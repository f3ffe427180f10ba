"""A LLaVA / BLIP-2-style vision-language assistant: CLIP ViT + projector + LLM.

    from assistant import ChatSession, Engine, load_for_inference
    model, processor, runtime = load_for_inference("default")
    engine = Engine(model, processor, runtime)

`load_model` gives the plain model (for training, export, or reading the code as plain transformers).
"""

from .model.config import ModelConfig, ProjectorConfig, VisionConfig
from .inference.engine import ChatSession, Engine
from .inference.generation import GenerationConfig
from .inference.runtime import Runtime
from .weights.loading import load_for_inference, load_model

__all__ = ["ModelConfig", "ProjectorConfig", "VisionConfig", "ChatSession", "Engine", "GenerationConfig",
           "Runtime", "load_for_inference", "load_model"]
