import torch
import torch.nn as nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from . import register


@register("qformer")
class QFormerProjector(nn.Module):
    """BLIP-2: learned queries cross-attend to the patch features through transformers'
    Blip2QFormerModel; a linear layer maps the query outputs into the LLM's embedding space.
    The image always costs `num_queries` tokens, whatever the number of patches."""

    def __init__(self, config, vision_hidden, llm_hidden, num_positions):
        super().__init__()
        settings = {k: v for k, v in config.qformer.items() if k not in ("model_type", "transformers_version", "dtype")}
        qconfig = Blip2QFormerConfig(**{"encoder_hidden_size": vision_hidden, **settings})
        self.num_tokens = config.num_queries
        self.query_tokens = nn.Parameter(torch.randn(1, config.num_queries, qconfig.hidden_size) * 0.02)
        self.qformer = Blip2QFormerModel(qconfig)
        self.language_projection = nn.Linear(qconfig.hidden_size, llm_hidden)

    def forward(self, features):
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=features).last_hidden_state
        return self.language_projection(out)
