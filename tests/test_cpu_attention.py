"""The prompts' attention on the CPU (assistant/cpu/attention.py): grouped-query attention with a mask through
SDPA's own grouping gives what transformers' SDPA attention gives with its copies of the keys and values."""

import copy

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from assistant.cpu.attention import NAME, use_cpu_grouped_sdpa


@torch.inference_mode()
def test_masked_grouped_query_attention_matches_transformers_sdpa(monkeypatch):
    grouped_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        grouped_calls.append(kwargs.get("enable_gqa", False))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, attn_implementation="sdpa")
    reference = LlamaForCausalLM(config).eval()
    ours = copy.deepcopy(reference)
    use_cpu_grouped_sdpa(ours)
    assert ours.config._attn_implementation == NAME
    ids = torch.randint(3, 512, (3, 7))
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]])  # left-padded rows
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = []
    for model in (reference, ours):
        cache = DynamicCache(config=config)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
        caches.append((logits, cache))
    assert grouped_calls == [False, False, True, True]  # transformers copies keys and values, we do not
    assert torch.allclose(caches[0][0], caches[1][0], atol=1e-5)
    # a prompt's second part after a cached first part (batch VQA's questions after a shared image prefix)
    more, more_mask = torch.randint(3, 512, (3, 4)), torch.cat([mask, torch.ones(3, 4, dtype=mask.dtype)], 1)
    after = [model(input_ids=more, attention_mask=more_mask, position_ids=positions[:, -1:] + torch.arange(1, 5),
                   past_key_values=cache).logits for model, (_, cache) in zip((reference, ours), caches)]
    assert torch.allclose(after[0], after[1], atol=1e-5)


def test_models_without_sdpa_attention_are_left_as_they_are():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    use_cpu_grouped_sdpa(model)
    assert model.config._attn_implementation == "eager"
