"""Llama-architecture attention and MLP blocks with their parallel projections as one linear layer each:
query/key/value as `qkv_proj`, gate/up as `gate_up_proj`. One matrix product instead of three (or two) on
the same input: each product costs a call, a parallel region and, on the CPU's int8/bf16 paths, a conversion
of its input, besides its bytes. Used by the compiled decode steps (weight_only.py) and by the int8 layers
(int8.py); both measured faster with the fusions (docs/performance.md).
"""

from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, apply_rotary_pos_emb


class FusedQKVLlamaAttention(LlamaAttention):
    """LlamaAttention with the query, key and value projections as one linear layer `qkv_proj`: one GEMM
    per step instead of three (each GEMM call costs a parallel region and a wrapper call as well as its
    bytes)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)  # its name before transformers 5.24
        input_shape = hidden_states.shape[:-1]
        heads_shape = (*input_shape, -1, self.head_dim)
        query, key, value = (t.view(heads_shape).transpose(1, 2)
                             for t in self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1))
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        out, weights = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation](
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class FusedGateUpLlamaMLP(LlamaMLP):
    """LlamaMLP with the gate and up projections as one linear layer `gate_up_proj` (one GEMM, not two)."""

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def concatenated_linear(layers: list[torch.nn.Linear]) -> torch.nn.Linear:
    """One linear layer whose outputs are those of `layers`, one after the other."""
    with torch.no_grad():
        fused = torch.nn.Linear(layers[0].in_features, sum(x.out_features for x in layers),
                                bias=layers[0].bias is not None, dtype=layers[0].weight.dtype)
        fused.weight.copy_(torch.cat([x.weight for x in layers]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([x.bias for x in layers]))
    return fused


def fuse_projections(llm, adapters: dict | None = None) -> None:
    """Llama-architecture attention and MLP blocks (SmolLM2, Llama, TinyLlama...) in place as their fused
    forms above, where their projections are plain linear layers; other architectures keep their own (exact
    classes: a subclass may compute more).
    `adapters` (lora_factors) follows: the fused layer's A is the parts' A stacked, its B block-diagonal."""
    adapters = {} if adapters is None else adapters
    for prefix, module in list(llm.named_modules()):
        if type(module) is LlamaAttention:
            names, fused, fused_class = ["q_proj", "k_proj", "v_proj"], "qkv_proj", FusedQKVLlamaAttention
        elif type(module) is LlamaMLP:
            names, fused, fused_class = ["gate_proj", "up_proj"], "gate_up_proj", FusedGateUpLlamaMLP
        else:
            continue
        if not all(type(getattr(module, n, None)) is torch.nn.Linear for n in names):
            continue  # a peft adapter or a quantised layer in place: left as it is
        module.__class__ = fused_class
        if fused_class is FusedQKVLlamaAttention:
            module.qkv_sizes = [getattr(module, n).out_features for n in names]
        parts = [f"{prefix}.{n}" for n in names]
        if all(p in adapters for p in parts):
            factors = [adapters.pop(p) for p in parts]
            adapters[f"{prefix}.{fused}"] = (torch.cat([a for a, _ in factors]),
                                             torch.block_diag(*[b for _, b in factors]))
        else:  # an adapter on some parts only: merged into them
            for p, n in zip(parts, names):
                merge_lora(getattr(module, n), adapters.pop(p, None))
        setattr(module, fused, concatenated_linear([getattr(module, n) for n in names]))
        for n in names:
            delattr(module, n)


def merge_lora(linear: torch.nn.Linear, lora) -> None:
    """Fold LoRA factors (A, B * scaling) into `linear`'s weight, in place."""
    if lora is not None:
        with torch.no_grad():
            linear.weight += (lora[1] @ lora[0]).to(linear.weight.dtype)
