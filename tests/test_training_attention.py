"""bf16 training on a CPU runs the LLM's attention as plain matrix products (assistant/cpu/training_attention.py):
the same loss and gradients as transformers' eager attention, within bf16's precision, on a padded batch."""

import torch
from transformers import AutoModelForCausalLM

from assistant.cpu.policy import bf16_training_attention_pays_off
from assistant.cpu.training_attention import NAME, use_for_training


def loss_and_grads(llm, ids, mask, labels):
    embeds = llm.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    loss.backward()
    return float(loss.detach()), embeds.grad.float()


def test_matches_eager_attention_on_a_padded_batch(tiny_llm_dir_gentle):
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_pretrained(tiny_llm_dir_gentle, dtype=torch.bfloat16, attn_implementation="eager")
    ids = torch.randint(10, 1000, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0  # the shorter row is padded on the right, as the collator pads
    labels = ids.masked_fill(mask == 0, -100)
    eager_loss, eager_grads = loss_and_grads(llm, ids, mask, labels)
    use_for_training(llm)
    assert llm.config._attn_implementation == NAME
    loss, grads = loss_and_grads(llm, ids, mask, labels)
    assert abs(loss - eager_loss) < 0.01 * eager_loss
    assert torch.isfinite(grads).all()
    assert (grads - eager_grads).norm() < 0.03 * eager_grads.norm()


def test_used_only_for_bf16_on_a_cpu_and_moderate_lengths():
    if torch.cuda.is_available():
        return
    assert bf16_training_attention_pays_off("bf16", 512)
    assert not bf16_training_attention_pays_off("no", 512)
    assert not bf16_training_attention_pays_off("bf16", 4096)  # its memory grows with the square of the length
