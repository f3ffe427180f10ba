"""Attention functions for the CPU, registered with transformers' attention interface when first used (never
at import):

- `cpu_grouped_sdpa` for prompts: transformers' SDPA attention, except that where query heads share key/value
  heads (grouped-query attention: SmolLM2, Llama 3, Qwen2...) and a mask is given, the keys and values are not
  copied once per query head. transformers asks SDPA for grouped-query attention (`enable_gqa`) only without a
  mask, because CUDA's fast kernels refuse it with one; PyTorch's CPU SDPA takes it, with the same result. A
  batch's packed prompt (packed_batch.py) attends row by row, as its `packed_layout` says.
- `grouped_decode_sdpa` for the compiled decode steps (compiled_decoder.py): one query token over the filled part
  of a static cache, through our kernel (decode_attention.py) where it is built and takes the shapes.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ..model.vision_language_model import base_llm
from . import decode_attention

NAME = "cpu_grouped_sdpa"
DECODE_NAME = "grouped_decode_sdpa"


def cpu_grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, packed_layout=None,
                     **kwargs):
    """`sdpa_attention_forward`, with masked grouped-query attention done by SDPA itself (module docstring);
    a batch's packed prompt (packed_batch.py) attends row by row, as its `packed_layout` says."""
    if packed_layout is not None:
        return packed_layout.attend(query, key, value, scaling), None
    groups = getattr(module, "num_key_value_groups", 1)
    if (attention_mask is None or groups == 1 or query.shape[2] == 1 or query.device.type != "cpu"
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def grouped_decode_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, except for one query token: attention over the first
    `valid_length` cache positions only, through our decode kernel (decode_attention.py) where it is built
    and takes the shapes, else through SDPA with the query heads that share a key/value head stacked as
    rows of one call (no per-head copies of the keys and values). Our kernel takes no mask: it serves one
    unpadded row, which sees every filled position; batches (left-padded rows) go through SDPA with the mask."""
    groups = getattr(module, "num_key_value_groups", 1)
    valid = kwargs.get("valid_length")
    if query.shape[2] != 1 or valid is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] == 1 and decode_attention.supports(module, query.dtype):
        return decode_attention.decode_attention(query, key, value, valid, module.scaling).transpose(1, 2), None
    batch, heads, _, dim = query.shape
    stacked = query.reshape(batch, heads // groups, groups, dim)
    mask = attention_mask[..., :valid] if attention_mask is not None else None
    out = torch.nn.functional.scaled_dot_product_attention(stacked, key[:, :, :valid], value[:, :, :valid],
                                                           attn_mask=mask, scale=module.scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


def _register(name: str, function) -> None:
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)


def use_cpu_grouped_sdpa(llm) -> None:
    """Switch a CPU LLM that uses SDPA attention to `cpu_grouped_sdpa`, in place (others are left as they are)."""
    base = base_llm(llm)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return
    if next(base.parameters()).device.type != "cpu":
        return
    _register(NAME, cpu_grouped_sdpa)
    base.set_attn_implementation(NAME)


def use_decode_attention(llm) -> None:
    """Switch the decode steps' copy of the LLM to `grouped_decode_sdpa`, in place."""
    _register(DECODE_NAME, grouped_decode_sdpa)
    llm.set_attn_implementation(DECODE_NAME)
