"""The model spec every entry point takes (`--model`): `default`, a local directory (ours, a llava-hf or a
BLIP-2 one), or a hub id (downloaded for users who have the hub; never needed here)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from peft import PeftModel

from .checkpoint import is_checkpoint, load_checkpoint, refuse_pickles
from ..cpu.compiled_decoder import CompiledDecoder, compiled_steps_run_fast
from ..cpu.attention import use_cpu_grouped_sdpa
from .bundled_default import DEFAULT_MODEL_DIR, untrained_default_config
from .llava import hf_model_type, load_llava
from ..cpu.int8 import AFTER_LOADING, BITSANDBYTES, calibrate_and_quantize_int8, fast_path_covers, resolve_quantize

log = logging.getLogger(__name__)


class ModelSpecError(ValueError):
    """A --model value that names nothing loadable; the message says what was tried."""


def load_model(spec: str = "default", *, quantize: str | None = None, device_map=None, merge_adapter: bool = False,
               compile_decode: bool | str = False, decode_batch_size: int = 1):
    """Resolve a model spec and load it -> (model, processor).

    `quantize`: None / "none" (full precision), "4bit" / "8bit" (bitsandbytes), "int8" (smoothed
    torch.ao dynamic int8 on the CPU, for inference) or "auto" (quantization.py). `merge_adapter`: fold a LoRA
    adapter into the LLM's weights (for inference: about 30% faster decoding here; int8 always does).
    `compile_decode`: with int8 on a CPU where compiled steps run fast (AVX2 / AVX-512 x86, or fast bf16), also
    start compiling the decode steps for generations of `decode_batch_size` rows in the background
    (compiled_decode.py; `model.compiled_decoder`): 1 for chat, the batch size for batch VQA; "deferred": make the
    decoder but let the caller start it (serve.py does once its server is built: compiling alongside slows that
    down 4x)."""
    mode = resolve_quantize(quantize)
    model, processor = _load(spec, None if mode in AFTER_LOADING else mode, device_map)
    if mode in AFTER_LOADING and not fast_path_covers(model.llm):
        log.warning("--model %s: the CPU fast path (int8, compiled decode steps) covers Llama-architecture LLMs "
                    "only; this %s LLM runs in full precision", spec, _family(model.llm))
        mode = None
    if mode in AFTER_LOADING and compile_decode and compiled_steps_run_fast():
        # made from the fp32 weights before they become int8, and before the adapter is merged (the decode
        # steps keep 4-bit base weights as they are, with the adapter beside them: compiled_decode.py)
        context = getattr(model.llm.config, "max_position_embeddings", 2048)
        try:
            decoder = CompiledDecoder(model.llm, max_length=min(context, decode_cache_length(decode_batch_size)),
                                      batch_size=decode_batch_size)
            model.compiled_decoder = decoder if compile_decode == "deferred" else decoder.start()
        except Exception as e:  # an LLM class without StaticCache / attention-interface support
            warnings.warn(f"compiled decode steps are off for this LLM, decoding stays eager ({e})", RuntimeWarning)
    if (merge_adapter or mode in AFTER_LOADING) and isinstance(model.llm, PeftModel) and mode not in BITSANDBYTES:
        model.llm = model.llm.merge_and_unload()  # no LoRA matmuls per token
    if mode in AFTER_LOADING:  # smoothed int8 linear layers (quantization.py says how and what it costs)
        model = calibrate_and_quantize_int8(model, processor)
        model.quantized = mode  # said in the UI header; checkpoints refuse to save it
    use_cpu_grouped_sdpa(model.llm)  # prompts' attention on the CPU without per-head copies (cpu_attention.py)
    return model, processor


def _family(llm) -> str:
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return type(base).__name__


def decode_cache_length(batch_size: int) -> int:
    """Positions the compiled steps' static cache holds per row: 4,096 for chat; for batches a cache of about
    16,384 positions in all (16 rows x 1,024: 380 MB for the default model; VQA prompts with one image are
    about 100 tokens), at least 256 a row. Longer generations decode eagerly."""
    return 4096 if batch_size == 1 else max(256, 16384 // batch_size)


def _load(spec: str, quantize: str | None, device_map):
    if spec == "default":
        if is_checkpoint(DEFAULT_MODEL_DIR):
            return load_checkpoint(DEFAULT_MODEL_DIR, quantize=quantize, device_map=device_map)
        from ..model.builder import build_model

        model, processor = build_model(untrained_default_config(), quantize=quantize, device_map=device_map)
        return model.eval(), processor
    path = Path(spec).expanduser()
    if path.exists():
        return _load_directory(path, spec, quantize, device_map)
    if _looks_like_hub_id(spec):
        return _load_directory(_download(spec), spec, quantize, device_map)
    raise ModelSpecError(f"--model {spec!r}: no such directory, and not a hub id (expected 'owner/name')")


def _load_directory(path: Path, spec: str, quantize, device_map):
    if not path.is_dir():
        raise ModelSpecError(f"--model {spec!r} is a file; expected a model directory")
    if is_checkpoint(path):
        return load_checkpoint(path, quantize=quantize, device_map=device_map)
    kind = hf_model_type(path)
    if kind in ("llava", "blip-2"):
        if quantize or device_map:
            raise ModelSpecError(f"--model {spec!r}: 4/8-bit and device_map loading of {kind} checkpoints is not "
                                 "supported yet; load without them (--quantize int8 works on the CPU)")
        refuse_pickles(path)
        if kind == "llava":
            return load_llava(str(path))
        from .blip2 import load_blip2

        return load_blip2(str(path))
    raise ModelSpecError(
        f"--model {spec!r}: {path} is neither one of our checkpoints (vlm_config.json), nor a llava-hf directory "
        "(config.json with model_type 'llava'), nor a BLIP-2 directory (model_type 'blip-2')"
        + (f"; its config.json says model_type {kind!r}" if kind else "")
    )


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt",
                                                               "*.model", "tokenizer*"]))
    except Exception as e:  # offline, unknown repo, gated...
        raise ModelSpecError(f"--model {repo_id!r}: could not download from the Hugging Face hub ({e})") from None
