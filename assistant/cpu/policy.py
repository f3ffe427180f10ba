"""Every hardware decision of the project, in one place: which device runs the model, what `--quantize auto`
means there, which LLM families the CPU fast path takes, and which kernels pay off on this CPU. Each answer
follows a measurement on the CPUs the project runs on (docs/performance.md has the figures)."""

from __future__ import annotations

import functools
import platform
import time

import torch

BITSANDBYTES = ("4bit", "8bit")  # applied while the weights load
AFTER_LOADING = ("int8",)  # applied to the loaded model by the CPU runtime
QUANTIZE_CHOICES = ("auto", "none", *BITSANDBYTES, *AFTER_LOADING)
QUANTIZE_HELP = ("LLM weights: auto (int8 on a CPU, full precision on a GPU), none (full precision), int8 (smoothed "
                 "int8 on the CPU: faster, answers can differ slightly from full precision), 4bit / 8bit "
                 "(bitsandbytes)")

# LLM architectures whose int8 layers, fused projections and compiled decode steps were checked against full
# precision on real weights (SmolLM2); others keep the plain path rather than risk silently wrong answers.
FAST_PATH_MODEL_TYPES = ("llama",)

# Prompt rows from which a layer's bf16 copy beats its int8 one (CPUs with fast bf16): the MLP output projection,
# then every other layer.
BF16_PROMPT_ROWS_FROM_MLP_OUTPUT = 16
BF16_PROMPT_ROWS_FROM = 32
# Without fast bf16, calls of this many rows or more (prompts, not batch VQA's decode steps of up to 16 rows) keep
# fp32 weights: AVX2's int8 kernels quantise activations to 7 bits, which costs accuracy on prompts.
PROMPT_ROWS_FP32_FROM = 17


def has_accelerator() -> bool:
    """A GPU (CUDA/ROCm), Apple MPS or Intel XPU is present. Without one, accelerate is told to use
    the CPU, which also makes a multi-process launch run CPU processes over gloo."""
    if torch.cuda.is_available():
        return True
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return True
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def resolve_quantize(mode: str | None) -> str | None:
    """A --quantize value -> what to run with (None: full precision). "auto": int8 on a CPU, where decoding is
    bound by reading weights; full precision on a GPU."""
    if mode in (None, "none"):
        return None
    if mode not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, not {mode!r}")
    if mode == "auto":
        return None if has_accelerator() else "int8"
    return mode


def fast_path_covers(llm) -> bool:
    """Whether the CPU fast path takes this LLM's architecture (FAST_PATH_MODEL_TYPES)."""
    from ..model.vision_language_model import base_llm

    base = base_llm(llm)
    return getattr(base.config, "model_type", None) in FAST_PATH_MODEL_TYPES


@functools.cache  # a property of the machine: decided once per process
def bf16_matmul_is_fast(size: int = 768, rows: int = 64) -> bool:
    """Whether bf16 matrix products run fast on this CPU (CPUs without bf16 units convert and run slower than
    fp32). On x86 the answer is the instructions torch reports (AMX or AVX-512 BF16): a timing taken while other
    programs load the CPU can say anything. Elsewhere, a timing: the best of interleaved trials, a bf16 product
    at least 1.5x faster than fp32."""
    cpu = torch.cpu
    if platform.machine().lower() in ("x86_64", "amd64") and hasattr(cpu, "_is_avx512_bf16_supported"):
        return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)() or cpu._is_avx512_bf16_supported())
    return bf16_timing_says_fast(size, rows)


def bf16_timing_says_fast(size: int = 768, rows: int = 64, trials: int = 5) -> bool:
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


def training_precision(setting: str = "auto") -> str:
    """Training's mixed precision as accelerate takes it: "auto" is bf16 autocast on a CUDA GPU that has bf16 and on
    a CPU that multiplies bf16 fast (on others bf16 products are many times slower than fp32), fp32 ("no")
    elsewhere; any other setting as given."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "no" if has_accelerator() or not bf16_matmul_is_fast() else "bf16"


# Training sequences up to this long use matrix-product attention (training_attention.py) under bf16 on a CPU;
# longer ones keep SDPA, whose memory does not grow with the square of the length.
MATRIX_TRAINING_ATTENTION_UP_TO = 1024


def bf16_training_attention_pays_off(precision: str, max_length: int) -> bool:
    """Whether to train with cpu/training_attention.py: under bf16 on a CPU, where PyTorch's flash-attention kernel
    runs slower in bf16 than in fp32 while bf16 matrix products run twice as fast (docs/performance.md)."""
    return precision == "bf16" and not has_accelerator() and max_length <= MATRIX_TRAINING_ATTENTION_UP_TO


def compiled_steps_run_fast() -> bool:
    """Whether to compile decode steps on this CPU: where they beat the eager int8 steps, x86 with AVX-512 or AVX2
    (the int8 weights are what a step reads, through inductor's micro-GEMMs), elsewhere only with fast bf16."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability == "AVX2" or capability.startswith("AVX512") or bf16_matmul_is_fast()


def int4_kernels_pay_off() -> bool:
    """Whether the compiled decode steps should keep int4 layers: with AVX-512 (inductor's int4 weight-only GEMM
    templates); with AVX2 only, torch's int4 kernel is compute-bound and every layer int8 is faster."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
