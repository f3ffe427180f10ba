"""GPU figures: decode tokens/s and instruct-stage training tokens/s and MFU on one CUDA GPU, for the
default composition and a larger one (CLIP ViT-L/14-336 shape + a Llama-3.2-1B shape). Random
weights of the real shapes (speed does not depend on the values); the LLM's tokenizer is SmolLM2's.
One JSON line (and --out FILE).

    python benchmarks/gpu_figures.py [--tokenizer DIR] [--compositions default,large] [--out FILE]

Training is measured as the trainer runs it: fp32 master weights under bf16 autocast, AdamW on the
trainable parts (default: vision tower + projector + LoRA r16 on all linear layers, as the recipe;
large: projector + LoRA, vision frozen, as LLaVA). FLOPs are counted by torch's FlopCounterMode on
one step; MFU is against the H100 SXM bf16 dense peak (989.4 TFLOP/s) and against an 8192^3 bf16
matmul measured in the same run."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assistant.model.builder import build_model  # noqa: E402
from assistant.model.config import ModelConfig, ProjectorConfig, VisionConfig  # noqa: E402
from assistant.model.vision_language_model import base_llm  # noqa: E402
from assistant.inference.engine import Engine  # noqa: E402
from assistant.inference.generation import GenerationConfig, decode  # noqa: E402
from assistant.weights.llm import resolve_llm_dir  # noqa: E402
from finetune.config import TrainConfig  # noqa: E402
from finetune.model_setup import prepare_llm  # noqa: E402

H100_BF16_DENSE = 989.4e12

COMPOSITIONS = {
    "default": {  # the shipped default model's shapes: 6-layer CLIP ViT at 96 px (36 tokens) + SmolLM2-135M
        "vision": dict(image_size=96, patch_size=16, hidden_size=192, intermediate_size=768, num_hidden_layers=6,
                       num_attention_heads=6),
        "llm": None,  # SmolLM2-135M's own config
        "vision_trains": True, "batch_size": 32, "text_tokens": 200,
    },
    "large": {  # CLIP ViT-L/14-336 (576 tokens) + a Llama-3.2-1B shape
        "vision": dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16),
        "llm": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
                    tie_word_embeddings=True),
        "vision_trains": False, "batch_size": 8, "text_tokens": 400,
    },
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(name: str, tokenizer_dir: str, device):
    spec = COMPOSITIONS[name]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = LlamaConfig.from_pretrained(tokenizer_dir)
    config = base if spec["llm"] is None else LlamaConfig(
        **spec["llm"], bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id)
    with torch.device(device):
        llm = LlamaForCausalLM(config)
    model_config = ModelConfig(vision=VisionConfig(model_type="clip", config=dict(spec["vision"])),
                               projector=ProjectorConfig(type="mlp2x_gelu"), llm=tokenizer_dir,
                               image_size=spec["vision"]["image_size"])
    model, processor = build_model(model_config, llm=llm, tokenizer=tokenizer)
    return model.to(device), processor, config


def sample(processor, image, text_tokens: int, answer: bool):
    """One image + a user text of about `text_tokens` tokens (+ a reply of the same length for training)."""
    words = " ".join(["the red circle is left of the blue square"] * (text_tokens // 20 + 1))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words}]}]
    if answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": words}]})
    return messages


def decode_figures(model, processor, image, runs=3, new_tokens=128) -> dict:
    model.eval()
    batch = processor([sample(processor, image, 40, False)], [[image]])
    rates, ttfts = [], []
    for _ in range(runs + 1):
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            embeds = model.embed(batch["input_ids"].to(model.device), model.encode_images(batch["pixel_values"]))
            stream = decode(model, embeds, batch["attention_mask"], GenerationConfig(max_new_tokens=new_tokens),
                            end_ids=set())
            next(stream)
            sync()
            t1 = time.perf_counter()
            n = sum(1 for _ in stream)
            sync()
        ttfts.append(t1 - t0)
        rates.append(n / (time.perf_counter() - t1))
    # the baseline: transformers' generate on the same LLM (text only, same length)
    ids = batch["input_ids"][:, batch["input_ids"][0] != processor.image_token_id].to(model.device)
    gen_rates = []
    for _ in range(runs + 1):
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            model.llm.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            sync()
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.llm.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            sync()
            gen_rates.append((new_tokens - 1) / (time.perf_counter() - t0 - prefill))
    # the engine's batched VQA path on this device (left padding, one vision call per batch)
    t0 = time.perf_counter()
    answers = Engine(model, processor).answer_batch([sample(processor, image, 10 * k, False) for k in (1, 2, 3, 4)],
                                                    [[image]] * 4, GenerationConfig(max_new_tokens=8))
    sync()
    batch4_s = time.perf_counter() - t0
    assert len(answers) == 4
    return {"engine_batch4_vqa_s": batch4_s, "decode_tokens_per_s": statistics.median(rates[1:]), "ttft_s": statistics.median(ttfts[1:]),
            "hf_generate_tokens_per_s": statistics.median(gen_rates[1:]), "prompt_tokens": int(batch["input_ids"].shape[1])}


def training_figures(model, processor, image, spec, steps=10) -> dict:
    cfg = TrainConfig(stage="instruct", vision="full" if spec["vision_trains"] else "frozen", llm="lora")
    cfg.lora.dropout = 0.0
    model.vision_tower.requires_grad_(spec["vision_trains"])
    model.projector.requires_grad_(True)
    model.llm = prepare_llm(model.llm, cfg)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    n = spec["batch_size"]
    batch = processor([sample(processor, image, spec["text_tokens"], True)] * n, [[image]] * n, with_labels=True,
                      add_generation_prompt=False)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    tokens = int(batch["attention_mask"].sum())

    def step():
        with torch.autocast(model.device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    # torch's SDPA FLOP formula rejects grouped-query shapes: count one step with eager attention (same math)
    base = base_llm(model.llm)
    base.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter:
        step()
    base.set_attn_implementation("sdpa")
    flops = counter.get_total_flops()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"batch": n, "tokens_per_step": tokens, "step_s": step_s, "train_tokens_per_s": tokens / step_s,
            "flops_per_step": flops, "achieved_tflops": flops / step_s / 1e12,
            "trainable_params": sum(p.numel() for p in trainable),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None}


def matmul_ceiling() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return 2 * 8192 ** 3 * 10 / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=None, help="an LLM directory with SmolLM2's tokenizer and config")
    p.add_argument("--compositions", default="default,large")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer_dir = args.tokenizer or resolve_llm_dir("smollm2-135m-instruct")
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    if device.type == "cuda":
        result["bf16_matmul_tflops_measured"] = matmul_ceiling() / 1e12
    image = Image.new("RGB", (96, 96), "white")
    for name in args.compositions.split(","):
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model, processor, _ = build(name, tokenizer_dir, device)
        figures = {"llm_params": sum(p.numel() for p in model.llm.parameters()),
                   "vision_params": sum(p.numel() for p in model.vision_tower.parameters()),
                   "image_tokens": model.tokens_per_image}
        model.to(torch.bfloat16)
        figures.update(decode_figures(model, processor, image))
        model.to(torch.float32)
        figures.update(training_figures(model, processor, image, COMPOSITIONS[name], args.steps))
        figures["mfu_vs_h100_peak"] = figures["achieved_tflops"] * 1e12 / H100_BF16_DENSE
        if "bf16_matmul_tflops_measured" in result:
            figures["mfu_vs_measured_matmul"] = figures["achieved_tflops"] / result["bf16_matmul_tflops_measured"]
        result[name] = figures
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({name: figures}), flush=True)
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()
