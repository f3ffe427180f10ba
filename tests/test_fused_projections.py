"""Fused projections (assistant/fused_projections.py): a Llama with query/key/value and gate/up as one layer each
computes what it computed before, prompts and cached steps alike; layers that are not plain linear ones stay."""

import copy

import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from assistant.cpu.fused_projections import FusedGateUpLlamaMLP, FusedQKVLlamaAttention, fuse_projections


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


@torch.inference_mode()
def test_a_fused_llama_computes_what_it_did():
    reference = tiny_llama()
    fused = copy.deepcopy(reference)
    fuse_projections(fused)
    block = fused.model.layers[0]
    assert type(block.self_attn) is FusedQKVLlamaAttention and type(block.mlp) is FusedGateUpLlamaMLP
    assert block.self_attn.qkv_proj.out_features == 64 + 2 * 32 and not hasattr(block.self_attn, "q_proj")
    ids, mask = torch.randint(0, 256, (2, 6)), torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    outputs = []
    for model in (reference, fused):
        cache = DynamicCache(config=model.config)
        prompt = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
        step = model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                     past_key_values=cache).logits
        outputs.append((prompt, step))
    for ours, theirs in zip(outputs[1], outputs[0]):
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_layers_with_a_peft_adapter_are_left_unfused():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "gate_proj"]))
    fuse_projections(model)
    block = model.get_base_model().model.layers[0]
    assert type(block.self_attn) is not FusedQKVLlamaAttention and hasattr(block.self_attn.q_proj, "lora_A")
    assert type(block.mlp) is not FusedGateUpLlamaMLP
