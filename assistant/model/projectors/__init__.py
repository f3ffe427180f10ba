"""Projector registry: each file registers one way of turning vision features into LLM embeddings.

Add a projector by writing one file with a class decorated by `@register("name")` whose
constructor takes (config: ProjectorConfig, vision_hidden: int, llm_hidden: int, num_positions: int)
and whose forward maps (images, patches, vision_hidden) -> (images, tokens, llm_hidden).
"""

from __future__ import annotations

import torch.nn as nn

PROJECTORS: dict[str, type[nn.Module]] = {}


def register(name: str):
    def decorate(cls):
        PROJECTORS[name] = cls
        return cls

    return decorate


def build_projector(config, vision_hidden: int, llm_hidden: int, num_positions: int) -> nn.Module:
    if config.type not in PROJECTORS:
        raise ValueError(f"unknown projector type {config.type!r}; known: {sorted(PROJECTORS)}")
    return PROJECTORS[config.type](config, vision_hidden, llm_hidden, num_positions)


from . import linear, mlp, qformer  # noqa: E402, F401  (registers the built-in projectors)
