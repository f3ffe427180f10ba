import torch.nn as nn

from . import register
from .pooling import pool_patches, pooled_count


@register("mlp2x_gelu")
class MLPProjector(nn.Module):
    """Two linear layers with GELU (LLaVA-1.5). Parameter names match transformers'
    LlavaMultiModalProjector, so export to LlavaForConditionalGeneration is a plain copy."""

    def __init__(self, config, vision_hidden, llm_hidden, num_positions):
        super().__init__()
        self.pool_grid = config.pool_grid
        self.num_tokens = pooled_count(num_positions, config.pool_grid)
        self.linear_1 = nn.Linear(vision_hidden, llm_hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_hidden, llm_hidden)

    def forward(self, features):
        return self.linear_2(self.act(self.linear_1(pool_patches(features, self.pool_grid))))
