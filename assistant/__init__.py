"""A LLaVA / BLIP-2-style vision-language assistant: CLIP ViT + projector + LLM.

    from assistant import ChatSession, Engine, load_for_inference
    model, processor, runtime = load_for_inference("default")
    engine = Engine(model, processor, runtime)

`load_model` gives the plain model (for training, export, or reading the code as plain transformers).
"""

import importlib

# Imported on first use, so that `import assistant` (and `python -m assistant.vqa --help`) loads no torch.
_EXPORTS = {
    "ModelConfig": ".model.config", "ProjectorConfig": ".model.config", "VisionConfig": ".model.config",
    "ChatSession": ".inference.engine", "Engine": ".inference.engine", "GenerationConfig": ".inference.generation",
    "Runtime": ".inference.runtime", "load_for_inference": ".weights.loading", "load_model": ".weights.loading",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'assistant' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
