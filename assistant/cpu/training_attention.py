"""Attention for bf16 training on a CPU, registered with transformers' attention interface when first used.

transformers' eager attention, except that the softmax takes the bf16 scores as they are: PyTorch's CPU softmax
computes a bf16 input in fp32 and rounds its output once, as eager's fp32 softmax followed by a cast to bf16 does,
without writing an fp32 copy of every (query, key) score and converting it back. With that, plain matrix-product
attention beats PyTorch's CPU flash-attention kernel, which runs slower in bf16 than in fp32 (policy.py decides
when; docs/performance.md has the figures).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import eager_mask

NAME = "cpu_bf16_training"


def bf16_training_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    groups = getattr(module, "num_key_value_groups", 1)  # grouped-query attention: query heads per key/value head
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask.to(scores.dtype)
    weights = torch.nn.functional.softmax(scores, dim=-1)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def use_for_training(llm) -> None:
    """Switch an LLM to `bf16_training_attention`, in place."""
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, bf16_training_attention)
        AttentionMaskInterface.register(NAME, eager_mask)
    llm.set_attn_implementation(NAME)
