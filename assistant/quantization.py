"""4-bit / 8-bit loading of the LLM through bitsandbytes (LLaVA's --load-4bit / --load-8bit).

bitsandbytes 0.45+ also runs 4-bit and 8-bit layers on the CPU (checked by tests/test_quantization.py),
so the options work everywhere; on a CPU they save memory, not time.
"""

from __future__ import annotations

import torch


def quantization_config(mode: str, compute_dtype=torch.float32):
    if mode not in ("4bit", "8bit"):
        raise ValueError(f"quantize must be '4bit' or '8bit', not {mode!r}")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise RuntimeError(f"{mode} loading needs bitsandbytes: pip install bitsandbytes ({e})") from None
    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=True)
    return BitsAndBytesConfig(load_in_8bit=True)
