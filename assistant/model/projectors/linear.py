import torch.nn as nn

from . import register
from .pooling import pool_patches, pooled_count


@register("linear")
class LinearProjector(nn.Module):
    """One linear map per patch (LLaVA v1)."""

    def __init__(self, config, vision_hidden, llm_hidden, num_positions):
        super().__init__()
        self.pool_grid = config.pool_grid
        self.num_tokens = pooled_count(num_positions, config.pool_grid)
        self.linear = nn.Linear(vision_hidden, llm_hidden)

    def forward(self, features):
        return self.linear(pool_patches(features, self.pool_grid))
