"""Quantised LLM weights, two families (`--quantize`):

- "4bit" / "8bit": bitsandbytes at load time (LLaVA's --load-4bit / --load-8bit; QLoRA training).
  bitsandbytes 0.45+ also runs them on the CPU (tests/test_quantization.py), where they save
  memory, not time.
- "int8": for CPU inference, the LLM's linear layers in int8 (torch.ao dynamic quantisation, fbgemm
  kernels: int8 weights with per-channel scales, activations quantised per call), prompts and decode
  steps alike. Each layer's input is first divided by per-channel factors that are folded into its
  weights (SmoothQuant, Xiao et al. 2023): a few activation channels are 10-100x larger than the rest,
  and the factors move part of that range into the weights, which int8 holds more easily. The factors
  come from a short fp32 calibration run at load time (a few drawn images and text prompts, about
  5 s). The MLP output projections (their inputs are the worst) and the embedding stay out of int8.
  Where the CPU has fast bf16 matrix units (checked at load), prompt rows run in bf16 instead: from 16
  rows in the MLP output projections, from 32 rows elsewhere (below that int8 is as fast). Where it has not
  (AVX2), prompt rows keep fp32 weights (from 17 rows: Fp32PromptLinear): int8 prompts cost 1.2-1.6 points of
  easy-VQA there, since fbgemm quantises activations to 7 bits on AVX2.
  Measured on the default model (README): easy-VQA 99.36% at batch 16 against fp32's 99.38% (plain
  dynamic int8 prompts: 0.7-0.9 points below); batch VQA about 2x faster. "auto" picks it on a CPU, "none" keeps fp32.
  torchao's int8 paths were measured too and were slower on this CPU in eager mode (they dequantise the
  weight at every call). Compiled, int8 weight-only decode steps are the fastest path measured here:
  compiled_decode.py, which serve.py starts beside this one (`load_model(..., compile_decode=True)`).
"""

from __future__ import annotations

import functools
import warnings

import torch

BITSANDBYTES = ("4bit", "8bit")
AFTER_LOADING = ("int8",)
# MLP output projections (Llama / Qwen / Mistral, Phi / OPT, GPT-NeoX, Mixtral-style names)
KEEP_FP32 = ("down_proj", "fc2", "dense_4h_to_h", "w2")
# Llama-style MLP gate and up projections, fused or not: their outputs feed only act(gate) * up, then the
# down projection (Bf16PromptLinear keeps them bf16 on the bf16 path)
MLP_INPUT_PROJECTIONS = ("gate_up_proj", "gate_proj", "up_proj")
# Without fast bf16, calls of this many rows or more (prompts; not batch VQA's decode steps of up to 16 rows) keep
# fp32 weights: Fp32PromptLinear
PROMPT_ROWS_FP32_FROM = 17
CHOICES = ("auto", "none", *BITSANDBYTES, *AFTER_LOADING)
HELP = ("LLM weights: auto (int8 on a CPU, full precision on a GPU), none (full precision), int8 (smoothed "
        "int8 on the CPU: faster, answers can differ slightly from full precision), 4bit / 8bit (bitsandbytes)")


def resolve_quantize(mode: str | None) -> str | None:
    """A --quantize value -> what to load with (None: full precision). "auto": int8 on a CPU, where
    decoding is bound by reading weights; full precision on a GPU."""
    if mode in (None, "none"):
        return None
    if mode not in CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(CHOICES)}, not {mode!r}")
    if mode == "auto":
        from .policy import has_accelerator

        return None if has_accelerator() else "int8"
    return mode


# LLM architectures whose int8 layers, fused projections and compiled decode steps are checked against full
# precision on real weights (SmolLM2: benchmarks/chat_speed.py's agreement, easy-VQA); others keep the plain path.
FAST_PATH_MODEL_TYPES = ("llama",)


def fast_path_covers(llm) -> bool:
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return getattr(base.config, "model_type", None) in FAST_PATH_MODEL_TYPES


SMOOTHING_ALPHA = 0.5  # SmoothQuant's migration strength (0: all range stays in the activations)


class SmoothedInt8Linear(torch.nn.Module):
    """`linear(x)` as int8(W * s) @ (x / s): SmoothQuant's per-input-channel factors s, then torch.ao's
    dynamic int8 linear (per-channel weight scales, fbgemm)."""

    def __init__(self, linear: torch.nn.Linear, input_absmax: torch.Tensor, alpha: float = SMOOTHING_ALPHA):
        super().__init__()
        weight = linear.weight.detach()
        factors = (input_absmax.clamp(min=1e-5) ** alpha) / (weight.abs().amax(0).clamp(min=1e-5) ** (1 - alpha))
        scaled = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        scaled.weight.data = weight * factors[None, :]
        if linear.bias is not None:
            scaled.bias.data = linear.bias.detach().clone()
        self.register_buffer("inverse_factors", (1.0 / factors).to(weight.dtype))
        self.linear = _dynamic_int8(scaled)

    def forward(self, x):
        return self.linear(x * self.inverse_factors)


def _dynamic_int8(linear: torch.nn.Linear):
    with warnings.catch_warnings():  # torch.ao's notice that eager quantisation moves to torchao
        warnings.simplefilter("ignore")
        linear.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        return torch.ao.nn.quantized.dynamic.Linear.from_float(linear)


class Bf16PromptLinear(torch.nn.Module):
    """Inputs of `min_rows` rows or more (prompts: many tokens at once) through a bf16 copy of `linear`,
    for a CPU that multiplies bf16 matrices fast (AMX / AVX-512 BF16 through oneDNN: 3x fp32 at 16+ rows
    here); fewer rows (decode steps) through `few_rows`: the fp32 layer itself or its int8 version.
    Output in the layer's dtype (fp32), or, with `bf16_output`, bf16 from the bf16 path: for the MLP's gate and
    up projections, whose outputs only meet in act(gate) * up on their way into the down projection's bf16
    product (converting 16 x 27 x 3,072 values to fp32 and back cost more than the activation itself).
    A bf16 input always takes the bf16 path."""

    def __init__(self, linear: torch.nn.Linear, few_rows: torch.nn.Module, min_rows: int, bf16_output: bool = False):
        super().__init__()
        self.few_rows = few_rows
        self.min_rows = min_rows
        self.bf16_output = bf16_output
        self.output_dtype = linear.weight.dtype
        self.register_buffer("weight_bf16", linear.weight.detach().to(torch.bfloat16), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias_bf16", bias, persistent=False)

    def forward(self, x):
        if x.dtype != torch.bfloat16 and x.numel() // x.shape[-1] < self.min_rows:
            return self.few_rows(x)
        y = torch.nn.functional.linear(x.to(torch.bfloat16), self.weight_bf16, self.bias_bf16)
        return y if self.bf16_output else y.to(self.output_dtype)


class Fp32PromptLinear(torch.nn.Module):
    """Inputs of `min_rows` rows or more (prompts) through the fp32 layer itself, fewer rows (decode steps) through
    `few_rows`, its smoothed int8 version: for a CPU without fast bf16. There fbgemm's dynamic int8 quantises each
    call's activations to 7 bits (`reduce_range`: AVX2's 16-bit multiply-adds would overflow with 8) with one scale
    for the whole call, and the default model lost 1.2-1.6 points of easy-VQA with int8 prompts (2-core AMD EPYC,
    AVX2: 98.23% at batch 16 on all 9,673 against fp32's 99.38%; 97.80% at batch 1 on the first 1,000 against
    99.40%). With fp32 prompt rows: 99.36% and 99.40%."""

    def __init__(self, linear: torch.nn.Linear, few_rows: torch.nn.Module, min_rows: int):
        super().__init__()
        self.linear, self.few_rows, self.min_rows = linear, few_rows, min_rows

    def forward(self, x):
        return self.linear(x) if x.numel() // x.shape[-1] >= self.min_rows else self.few_rows(x)


@functools.cache  # a property of the machine: decided once per process (load_model asks twice)
def bf16_matmul_is_fast(size: int = 768, rows: int = 64) -> bool:
    """Whether bf16 matrix products run fast on this CPU (measured: CPUs without bf16 units convert and run
    slower than fp32). On x86 the answer is the instructions torch reports (AMX or AVX-512 BF16): a timing
    taken while other programs load the CPU can say anything. Elsewhere, a timing: the best of interleaved
    trials, a bf16 product at least 1.5x faster than fp32."""
    import platform

    cpu = torch.cpu
    if platform.machine().lower() in ("x86_64", "amd64") and hasattr(cpu, "_is_avx512_bf16_supported"):
        return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)() or cpu._is_avx512_bf16_supported())
    return bf16_timing_says_fast(size, rows)


def bf16_timing_says_fast(size: int = 768, rows: int = 64, trials: int = 5) -> bool:
    import time

    x, w = torch.randn(rows, size), torch.randn(size, size)
    operands = {dtype: (x.to(dtype), w.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(operands, float("inf"))
    for _ in range(trials):  # interleaved, best of each: other work on the CPU only ever adds time
        for dtype, (a, b) in operands.items():
            torch.nn.functional.linear(a, b)
            start = time.perf_counter()
            for _ in range(10):
                torch.nn.functional.linear(a, b)
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.bfloat16] * 1.5 < best[torch.float32]


def linear_input_ranges(llm, run_calibration) -> dict[str, torch.Tensor]:
    """Per-input-channel absolute maxima of every linear layer's input while `run_calibration()` runs."""
    ranges: dict[str, torch.Tensor] = {}

    def record(name, inputs):
        x = inputs[0].detach()
        top = x.abs().reshape(-1, x.shape[-1]).amax(0).float()
        ranges[name] = torch.maximum(ranges[name], top) if name in ranges else top

    hooks = [module.register_forward_pre_hook(lambda _m, inputs, name=name: record(name, inputs))
             for name, module in llm.named_modules() if isinstance(module, torch.nn.Linear)]
    try:
        run_calibration()
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def quantize_int8(llm, input_ranges: dict[str, torch.Tensor]):
    """Replace the CPU LLM's linear layers, in place, by int8 ones: smoothed where calibration saw their
    inputs, plain dynamic int8 otherwise (the LM head: its input is normalised); MLP output projections stay
    fp32. Where this CPU multiplies bf16 fast, prompt rows of both go through bf16 (Bf16PromptLinear).
    Returns the LLM."""
    if next(llm.parameters()).device.type != "cpu":
        raise ValueError("--quantize int8 runs on the CPU; on a GPU use 4bit or 8bit (bitsandbytes) or none")
    bf16_prompts = bf16_matmul_is_fast()
    for name, module in [(n, m) for n, m in llm.named_modules() if isinstance(m, torch.nn.Linear)]:
        if name.rsplit(".", 1)[-1] in KEEP_FP32:
            # bf16 beats fp32 3x from 16 rows
            replacement = Bf16PromptLinear(module, module, min_rows=16) if bf16_prompts else module
        elif name in input_ranges and module is not llm.get_output_embeddings():
            replacement = SmoothedInt8Linear(module, input_ranges[name])
            # against smoothed int8, bf16 wins from about 32 rows (576-wide layers, AMX; 128 was measured before
            # torch 2.13 and this machine's AMX; VQA A/B at 32 against 128: batch 16 +2.5%, batch 1 +7%, same answers)
            if bf16_prompts:
                replacement = Bf16PromptLinear(module, replacement, min_rows=32,
                                               bf16_output=name.rsplit(".", 1)[-1] in MLP_INPUT_PROJECTIONS)
            else:  # prompts in fp32 (int8 cost accuracy there: Fp32PromptLinear); batch VQA's steps of 16 rows int8
                replacement = Fp32PromptLinear(module, replacement, min_rows=PROMPT_ROWS_FP32_FROM)
        else:
            replacement = _dynamic_int8(module)
        llm.set_submodule(name, replacement)
    return llm


def calibrate_and_quantize_int8(model, processor):
    """`quantize_int8` on a vision-language model, calibrated by answering a few questions in fp32 about
    drawn images (shapes, a gradient) and a few text-only prompts through the real engine."""
    from ..inference.engine import ChatSession, Engine
    from .fused_projections import fuse_projections
    from ..inference.generation import GenerationConfig

    # query/key/value and gate/up as one layer each (fused_projections.py) before the calibration, so that each
    # fused layer is smoothed and quantised as one: fewer products and input conversions per prompt
    fuse_projections(model.llm)
    engine = Engine(model, processor)

    def run():
        for question, image in _calibration_prompts():
            session = ChatSession()
            session.add_user_message(question, [image] if image is not None else [])
            for _ in engine.stream_chat(session, GenerationConfig(max_new_tokens=16)):
                pass

    ranges = linear_input_ranges(model.llm, run)
    model.llm = quantize_int8(model.llm, ranges)
    return model


def _calibration_prompts():
    from PIL import Image, ImageDraw

    shapes = Image.new("RGB", (224, 224), (245, 245, 245))
    d = ImageDraw.Draw(shapes)
    d.ellipse([20, 30, 90, 100], fill=(220, 30, 30))
    d.rectangle([130, 40, 200, 110], fill=(30, 70, 220))
    d.polygon([(112, 130), (60, 210), (170, 210)], fill=(240, 210, 20))
    gradient = Image.linear_gradient("L").resize((224, 224)).convert("RGB")
    gradient = Image.merge("RGB", (gradient.getchannel(0), gradient.rotate(90).getchannel(0),
                                   Image.new("L", (224, 224), 120)))
    short = " Answer the question using a single word or phrase."
    return [("Describe the image.", shapes), ("What color is the circle?" + short, shapes),
            ("How many objects are there?" + short, shapes), ("What is in this picture?", gradient),
            ("What is the capital of France?", None), ("Write a haiku about autumn.", None),
            ("List five animals that live in the sea.", None)]


def quantization_config(mode: str, compute_dtype=None):
    if mode not in BITSANDBYTES:
        raise ValueError(f"bitsandbytes quantize must be '4bit' or '8bit', not {mode!r}")
    try:
        import bitsandbytes  # noqa: F401
        import torch
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise RuntimeError(f"{mode} loading needs bitsandbytes: pip install bitsandbytes ({e})") from None
    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=compute_dtype or torch.float32, bnb_4bit_use_double_quant=True)
    return BitsAndBytesConfig(load_in_8bit=True)
