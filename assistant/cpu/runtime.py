"""The CPU runtime: `prepare` makes a loaded model fast for inference on this machine, as policy.py decides, and
returns the Runtime that says how (inference/runtime.py), which the engine takes."""

from __future__ import annotations

import logging
import warnings

from peft import PeftModel

from ..inference.runtime import Runtime
from ..model.vision_language_model import base_llm
from .attention import use_cpu_grouped_sdpa
from .compiled_decoder import CompiledDecoder
from .int8 import calibrate_and_quantize_int8
from .policy import AFTER_LOADING, BITSANDBYTES, compiled_steps_run_fast, fast_path_covers

log = logging.getLogger(__name__)


def prepare(model, processor, mode: str | None, *, compile_decode: bool | str = False, decode_batch_size: int = 1,
            merge_adapter: bool = True, spec: str = "the model") -> Runtime:
    """Make a loaded model fast for inference on this machine, in place, and say how -> Runtime.

    `mode`: what policy.resolve_quantize gave (None, "int8", "4bit", "8bit"). `merge_adapter`: fold a LoRA adapter
    into the LLM's weights (no LoRA products per token). `compile_decode`: with int8 on a CPU where compiled steps
    pay off, compile decode steps for generations of `decode_batch_size` rows in the background (1 for chat, the
    batch size for batch VQA); "deferred": make the decoder and let the caller start it."""
    runtime = Runtime(quantized=mode if mode in BITSANDBYTES else None)
    if mode in AFTER_LOADING and not fast_path_covers(model.llm):
        base = base_llm(model.llm)
        note = (f"the CPU fast path (int8, compiled decode steps) covers Llama-architecture LLMs only; "
                f"{type(base).__name__} runs in full precision")
        log.warning("--model %s: %s", spec, note)
        runtime.notes.append(note)
        mode = None
    if mode in AFTER_LOADING and compile_decode and compiled_steps_run_fast():
        # made from the full-precision weights, before the adapter is merged (the decode steps keep 4-bit base
        # weights as they are, with the adapter beside them: weight_only.py)
        context = getattr(model.llm.config, "max_position_embeddings", 2048)
        try:
            decoder = CompiledDecoder(model.llm, max_length=min(context, decode_cache_length(decode_batch_size)),
                                      batch_size=decode_batch_size)
            runtime.decoder = decoder if compile_decode == "deferred" else decoder.start()
        except Exception as e:  # an LLM class without StaticCache / attention-interface support
            warnings.warn(f"compiled decode steps are off for this LLM, decoding stays eager ({e})", RuntimeWarning)
    if (merge_adapter or mode in AFTER_LOADING) and isinstance(model.llm, PeftModel) and mode not in BITSANDBYTES:
        model.llm = model.llm.merge_and_unload()
    if mode in AFTER_LOADING:
        calibrate_and_quantize_int8(model, processor)
        runtime.quantized = mode
    use_cpu_grouped_sdpa(model.llm)  # prompts: no per-head copies of keys and values; batches packed
    return runtime


def decode_cache_length(batch_size: int) -> int:
    """Positions the compiled steps' static cache holds per row: 4,096 for chat; for batches about 16,384 in all,
    at least 256 a row. Longer generations decode eagerly."""
    return 4096 if batch_size == 1 else max(256, 16384 // batch_size)
