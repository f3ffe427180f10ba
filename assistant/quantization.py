"""Quantised LLM weights, two families (`--quantize`):

- "4bit" / "8bit": bitsandbytes at load time (LLaVA's --load-4bit / --load-8bit; QLoRA training).
  bitsandbytes 0.45+ also runs them on the CPU (tests/test_quantization.py), where they save
  memory, not time.
- "int8wo": weight-only int8 with torchao after loading (activations stay fp32). Decoding on a
  CPU reads every weight once per token, so a quarter of the bytes is what makes it faster. It
  changes answers slightly (measured in the README), so it is a choice: "auto" picks it on a CPU,
  "none" keeps fp32.
"""

from __future__ import annotations

BITSANDBYTES = ("4bit", "8bit")
WEIGHT_ONLY = ("int8wo",)
CHOICES = ("auto", "none", *BITSANDBYTES, *WEIGHT_ONLY)


def resolve_quantize(mode: str | None) -> str | None:
    """A --quantize value -> what to load with (None: full precision). "auto": int8wo on a CPU, where
    decoding is bound by reading weights; full precision on a GPU."""
    if mode in (None, "none"):
        return None
    if mode not in CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(CHOICES)}, not {mode!r}")
    if mode == "auto":
        from .devices import has_accelerator

        return None if has_accelerator() else "int8wo"
    return mode


def quantize_weights(llm, mode: str):
    """Weight-only quantisation of the LLM's linear layers in place (torchao's maintained path)."""
    if mode != "int8wo":
        raise ValueError(f"weight-only quantize mode must be one of {WEIGHT_ONLY}, not {mode!r}")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise RuntimeError(f"--quantize {mode} needs torchao: pip install torchao ({e})") from None
    quantize_(llm, Int8WeightOnlyConfig())
    return llm


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
