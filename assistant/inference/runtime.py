"""How a loaded model runs, apart from the model: what the engine needs to know of the speed work done on it.
On a GPU, or with `--quantize none` and no compile, it is empty and the model runs as plain transformers code;
on a CPU, cpu/runtime.py fills it in."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Runtime:
    """What makes the model fast here: its weights' quantisation (said in the UI; such a model is for inference
    only) and the compiled decode steps, when there are any (else the engine steps eagerly)."""

    quantized: str | None = None  # "int8" (this runtime's layers) or "4bit" / "8bit" (bitsandbytes, at load)
    decoder: object | None = None  # a cpu.compiled_decoder.CompiledDecoder
    notes: list[str] = field(default_factory=list)  # what was left on the plain path, and why
