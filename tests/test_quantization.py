"""4-bit / 8-bit LLM loading through bitsandbytes, dynamic int8 on the CPU, and accelerate placement."""

import pytest
import torch
from helpers import image_question, random_image, tiny_config

from assistant.model.builder import build_model
from assistant.weights.checkpoint import save_checkpoint
from assistant.inference.engine import Engine
from assistant.inference.generation import GenerationConfig
from assistant.weights.loading import load_for_inference, load_model


@pytest.mark.parametrize("mode,layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_llm_runs_and_stays_close(tiny_llm_dir_gentle, tmp_path, mode, layer):
    torch.manual_seed(0)
    model, processor = build_model(tiny_config(tiny_llm_dir_gentle))
    save_checkpoint(model, processor, tmp_path / "ckpt")
    full, _ = load_model(str(tmp_path / "ckpt"))
    quant, qproc = load_model(str(tmp_path / "ckpt"), quantize=mode)
    assert type(quant.llm.model.layers[0].mlp.down_proj).__name__ == layer
    batch = qproc([image_question()], [[random_image()]])
    with torch.no_grad():
        a, b = full(**batch).logits, quant(**batch).logits
    assert torch.isfinite(b).all()
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95
    answer = Engine(quant, qproc).answer_batch([image_question()], [[random_image()]],
                                               GenerationConfig(max_new_tokens=3))
    assert isinstance(answer[0], str)


def test_device_map_auto_places_every_part(tiny_llm_dir, tmp_path):
    model, processor = build_model(tiny_config(tiny_llm_dir))
    save_checkpoint(model, processor, tmp_path / "ckpt")
    placed, proc = load_model(str(tmp_path / "ckpt"), device_map="auto")
    devices = {p.device for p in placed.parameters()}
    assert len(devices) == 1  # one CPU here; on GPUs accelerate spreads the LLM and the tower follows
    with torch.no_grad():
        assert torch.isfinite(placed(**proc([image_question()], [[random_image()]])).logits).all()


def test_bad_quantize_value():
    from assistant.weights.llm import quantization_config

    with pytest.raises(ValueError, match="4bit"):
        quantization_config("3bit")


def test_int8_merges_the_adapter_and_stays_close(tiny_llm_dir_gentle, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model, processor = build_model(tiny_config(tiny_llm_dir_gentle))
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    save_checkpoint(model, processor, tmp_path / "ckpt")
    full, _ = load_model(str(tmp_path / "ckpt"), quantize="none")
    quant, qproc, runtime = load_for_inference(str(tmp_path / "ckpt"), quantize="int8")
    assert runtime.quantized == "int8" and not hasattr(quant.llm, "peft_config")  # merged, then quantised
    from assistant.cpu.int8 import SmoothedInt8Linear

    layer = quant.llm.model.layers[0]  # query/key/value and gate/up fused (fused_projections.py)
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj):
        linear = getattr(linear, "few_rows", linear)  # prompt rows bypass int8 (bf16 where it is fast, else fp32)
        assert isinstance(linear, SmoothedInt8Linear)  # calibrated at load time
        assert isinstance(linear.linear, torch.ao.nn.quantized.dynamic.Linear)  # torch.ao dynamic int8
        assert linear.inverse_factors.min() > 0
    down = layer.mlp.down_proj  # outlier activations: kept out of int8 (prompt rows bf16 where that is fast)
    assert type(getattr(down, "few_rows", down)) is torch.nn.Linear
    assert isinstance(quant.llm.get_output_embeddings(), torch.ao.nn.quantized.dynamic.Linear)
    batch = qproc([image_question()], [[random_image()]])
    with torch.no_grad():
        a, b = full(**batch).logits, quant(**batch).logits
    # int8 weights and 7-bit dynamic activations on a 64-wide random model: a few % off
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98
    answer = Engine(quant, qproc, runtime).answer_batch([image_question()], [[random_image()]],
                                                        GenerationConfig(max_new_tokens=3))
    assert isinstance(answer[0], str)
    with pytest.raises(ValueError, match="for inference"):
        save_checkpoint(quant, qproc, tmp_path / "again")


def test_quantize_auto_and_bad_values():
    from assistant.cpu.policy import resolve_quantize

    assert resolve_quantize("auto") == ("int8" if not torch.cuda.is_available() else None)
    assert resolve_quantize("none") is None and resolve_quantize(None) is None
    with pytest.raises(ValueError, match="int8"):
        resolve_quantize("int3")
