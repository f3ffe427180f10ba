"""The model spec every entry point takes (`--model`): `default`, a local directory (ours, a llava-hf or a
BLIP-2 one), or a hub id (downloaded for users who have the hub; never needed here)."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from ..cpu.policy import BITSANDBYTES, resolve_quantize
from ..cpu.runtime import prepare
from .bundled_default import DEFAULT_MODEL_DIR, untrained_default_config
from .checkpoint import is_checkpoint, load_checkpoint, refuse_pickles
from .llava import hf_model_type, load_llava


class ModelSpecError(ValueError):
    """A --model value that names nothing loadable; the message says what was tried."""


def load_model(spec: str = "default", *, quantize: str | None = None, device_map=None, merge_adapter: bool = False):
    """Resolve a model spec and load it -> (model, processor): plain transformers modules in full precision, or
    with bitsandbytes' 4/8-bit LLM layers (`quantize` "4bit" / "8bit"). `merge_adapter`: fold a LoRA adapter into
    the LLM's weights. To run fast for inference, use `load_for_inference`."""
    if quantize not in (None, "none", *BITSANDBYTES):
        raise ValueError(f"load_model takes quantize None, '4bit' or '8bit', not {quantize!r}: int8 and auto are "
                         "applied by the runtime (load_for_inference)")
    model, processor = _load(spec, None if quantize == "none" else quantize, device_map)
    if merge_adapter and isinstance(model.llm, PeftModel) and quantize not in BITSANDBYTES:
        model.llm = model.llm.merge_and_unload()
    return model, processor


def load_for_inference(spec: str = "default", *, quantize: str | None = "auto", device_map=None,
                       compile_decode: bool | str = False, decode_batch_size: int = 1):
    """Load a model spec for answering -> (model, processor, runtime): the model as `load_model` gives it, made
    fast for this machine by the runtime it returns (cpu/runtime.py; `quantize`: the --quantize choices)."""
    mode = resolve_quantize(quantize)
    model, processor = load_model(spec, quantize=mode if mode in BITSANDBYTES else None, device_map=device_map)
    runtime = prepare(model, processor, mode, compile_decode=compile_decode, decode_batch_size=decode_batch_size,
                      spec=spec)
    return model, processor, runtime


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
