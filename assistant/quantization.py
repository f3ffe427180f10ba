"""Quantised LLM weights, two families (`--quantize`):

- "4bit" / "8bit": bitsandbytes at load time (LLaVA's --load-4bit / --load-8bit; QLoRA training).
  bitsandbytes 0.45+ also runs them on the CPU (tests/test_quantization.py), where they save
  memory, not time.
- "int8": for the token-by-token decode steps, a copy of the LLM whose linear layers use int8
  weights and dynamically quantised activations (torch.ao's dynamic quantisation, fbgemm kernels;
  the MLP output projections and the embedding stay fp32 and are shared with the original).
  Prompts (prefill) keep going through the fp32 LLM: with them in int8 too, easy-VQA lost 0.9
  points; this way it scores as fp32 (README). A decode step reads every weight once, so fewer
  bytes is what makes it faster. "auto" picks it on a CPU, "none" keeps fp32. torchao's int8 paths
  were measured too and were slower on this CPU (they dequantise the weight at every call).
"""

from __future__ import annotations

BITSANDBYTES = ("4bit", "8bit")
AFTER_LOADING = ("int8",)
# MLP output projections (Llama / Qwen / Mistral, Phi / OPT, GPT-NeoX, Mixtral-style names)
KEEP_FP32 = ("down_proj", "fc2", "dense_4h_to_h", "w2")
CHOICES = ("auto", "none", *BITSANDBYTES, *AFTER_LOADING)


def resolve_quantize(mode: str | None) -> str | None:
    """A --quantize value -> what to load with (None: full precision). "auto": int8 on a CPU, where
    decoding is bound by reading weights; full precision on a GPU."""
    if mode in (None, "none"):
        return None
    if mode not in CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(CHOICES)}, not {mode!r}")
    if mode == "auto":
        from .devices import has_accelerator

        return None if has_accelerator() else "int8"
    return mode


def int8_decode_copy(llm):
    """An int8 copy of a CPU LLM for decode steps, sharing the original's embedding and fp32 layers."""
    import copy
    import warnings

    import torch

    if next(llm.parameters()).device.type != "cpu":
        raise ValueError("--quantize int8 runs on the CPU; on a GPU use 4bit or 8bit (bitsandbytes) or none")
    keep = {name: module for name, module in llm.named_modules() if name.rsplit(".", 1)[-1] in KEEP_FP32}
    decode_llm = copy.deepcopy(llm)
    decode_llm.set_input_embeddings(llm.get_input_embeddings())
    for name, module in keep.items():  # the same fp32 modules, not copies
        parent, _, child = name.rpartition(".")
        setattr(decode_llm.get_submodule(parent), child, module)
    with warnings.catch_warnings():  # torch.ao's notice that eager quantisation moves to torchao
        warnings.simplefilter("ignore")
        # Per-channel weight scales. The MLP's output projection stays fp32: its inputs carry outlier
        # activations that 7-bit dynamic quantisation destroys (measured on the default model,
        # easy-VQA, 192 questions: 97.9% fp32, 80.7% with every layer int8, 98.4% with it kept fp32).
        spec = {name: torch.ao.quantization.per_channel_dynamic_qconfig for name, module in decode_llm.named_modules()
                if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in KEEP_FP32}
        return torch.ao.quantization.quantize_dynamic(decode_llm, spec, dtype=torch.qint8, inplace=True)


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
