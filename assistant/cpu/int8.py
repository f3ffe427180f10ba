"""`--quantize int8` on the CPU: the LLM's linear layers as smoothed int8 layers for inference.

Each layer's input is divided by per-channel factors that are folded into its weights (SmoothQuant, Xiao et al.
2023): a few activation channels are far larger than the rest, and the factors move part of that range into the
weights, which int8 holds more easily. The factors come from a short full-precision calibration run at load (a few
drawn images and text prompts). The MLP output projections (their inputs are the worst) and the embedding stay
out of int8. Prompts, which multiply many rows at once, go through bf16 copies where the CPU multiplies bf16 fast
and through the full-precision layers where it does not (policy.py decides; docs/performance.md has the figures).
"""

from __future__ import annotations

import warnings

import torch

from .policy import BF16_PROMPT_ROWS_FROM, BF16_PROMPT_ROWS_FROM_MLP_OUTPUT, PROMPT_ROWS_FP32_FROM, bf16_matmul_is_fast

# MLP output projections (Llama / Qwen / Mistral, Phi / OPT, GPT-NeoX, Mixtral-style names)
KEEP_FP32 = ("down_proj", "fc2", "dense_4h_to_h", "w2")
# Llama-style MLP gate and up projections, fused or not: their outputs feed only act(gate) * up, then the
# down projection (Bf16PromptLinear keeps them bf16 on the bf16 path)
MLP_INPUT_PROJECTIONS = ("gate_up_proj", "gate_proj", "up_proj")

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
        return Int8Linear.from_float(linear)


class Int8Linear(torch.ao.nn.quantized.dynamic.Linear):
    """torch.ao's dynamic int8 linear layer, with a gradient for its input where one is asked for: int8's kernel
    has none, and an explanation of an answer (assistant/explain.py) differentiates through the runtime's layers.
    The gradient is the dequantised weight's, as if the layer were its full-precision equivalent."""

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return _Int8Product.apply(x, self)
        return super().forward(x)


class _Int8Product(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return torch.ao.nn.quantized.dynamic.Linear.forward(layer, x)

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.layer.weight().dequantize()
        return (grad.to(weight.dtype) @ weight).to(grad.dtype), None


class Bf16PromptLinear(torch.nn.Module):
    """Inputs of `min_rows` rows or more (prompts: many tokens at once) through a bf16 copy of `linear`,
    for a CPU that multiplies bf16 matrices fast (AMX / AVX-512 BF16 through oneDNN: 3x fp32 at 16+ rows
    here); fewer rows (decode steps) through `few_rows`: the fp32 layer itself or its int8 version.
    Output in the layer's dtype (fp32), or, with `bf16_output`, bf16 from the bf16 path: for the MLP's gate and
    up projections, whose outputs only meet in act(gate) * up on their way into the down projection's bf16
    product (converting them to fp32 and back costs more than the activation itself).
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
    `few_rows`, its smoothed int8 version: for a CPU without fast bf16, where fbgemm's dynamic int8 quantises each
    call's activations to 7 bits (`reduce_range`: AVX2's 16-bit multiply-adds would overflow with 8) with one scale
    for the whole call, which costs prompts accuracy."""

    def __init__(self, linear: torch.nn.Linear, few_rows: torch.nn.Module, min_rows: int):
        super().__init__()
        self.linear, self.few_rows, self.min_rows = linear, few_rows, min_rows

    def forward(self, x):
        return self.linear(x) if x.numel() // x.shape[-1] >= self.min_rows else self.few_rows(x)


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
            replacement = module
            if bf16_prompts:
                replacement = Bf16PromptLinear(module, module, min_rows=BF16_PROMPT_ROWS_FROM_MLP_OUTPUT)
        elif name in input_ranges and module is not llm.get_output_embeddings():
            replacement = SmoothedInt8Linear(module, input_ranges[name])
            if bf16_prompts:
                replacement = Bf16PromptLinear(module, replacement, min_rows=BF16_PROMPT_ROWS_FROM,
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
    from ..inference.generation import GenerationConfig
    from .fused_projections import fuse_projections

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
