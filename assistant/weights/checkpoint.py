"""Our checkpoint format: a directory of JSON and safetensors only.

    vlm_config.json            what to build (ModelConfig)
    vision_tower.safetensors   vision tower weights
    projector.safetensors      projector weights
    preprocessor_config.json   the image processor
    chat_template.jinja        the chat template the model was trained with (typed content parts)
    adapter/                   optional peft LoRA adapter on top of the LLM named in vlm_config.json
    llm/                       optional full LLM (+ tokenizer), when its weights were trained or merged

No pickle is ever read and no remote code is ever run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor

from ..model.builder import build_model
from ..model.config import CONFIG_NAME, ModelConfig
from .llm import PICKLE_SUFFIXES, load_llm, refuse_pickle_only


def is_checkpoint(path) -> bool:
    return Path(path, CONFIG_NAME).is_file()


def state_dict_for_saving(module: torch.nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


TEMPLATE_NAME = "chat_template.jinja"
MODEL_ENTRIES = ("vision_tower.safetensors", "projector.safetensors", "preprocessor_config.json", TEMPLATE_NAME,
                 "adapter", "llm")


def save_checkpoint(model, processor, directory, *, save_llm: bool = False) -> Path:
    """Write the model into `directory` (other files there, such as training logs, are kept).

    Everything is written to a temporary folder first and moved in, `vlm_config.json` last: a crash
    leaves a directory without a config (not a checkpoint) rather than a half-written one.
    `save_llm`: also write the full LLM (when its own weights were trained, not only a LoRA adapter).
    """
    if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()):
        raise ValueError("this model was prepared for inference (int8 layers: --quantize int8); load it "
                         "without quantization to save or train it")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".save-tmp-"))
    try:
        _write(model, processor, tmp, save_llm)
        (directory / CONFIG_NAME).unlink(missing_ok=True)
        for entry in MODEL_ENTRIES:
            target, new = directory / entry, tmp / entry
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            if new.exists():
                os.replace(new, target)
        os.replace(tmp / CONFIG_NAME, directory / CONFIG_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _write(model, processor, out: Path, save_llm: bool) -> None:
    from peft import PeftModel

    model.config.save(out)
    save_file(state_dict_for_saving(model.vision_tower.model), str(out / "vision_tower.safetensors"))
    save_file(state_dict_for_saving(model.projector), str(out / "projector.safetensors"))
    processor.image_processor.save_pretrained(out)
    (out / TEMPLATE_NAME).write_text(processor.chat.chat_template)
    llm = model.llm
    if isinstance(llm, PeftModel):
        llm.save_pretrained(out / "adapter", safe_serialization=True, save_embedding_layers=_embeddings_adapted(llm))
        # the base model as the spec names it ("smollm2-135m-instruct", a hub id), not this machine's cache path
        adapter_config = out / "adapter" / "adapter_config.json"
        settings = json.loads(adapter_config.read_text())
        settings["base_model_name_or_path"] = model.config.llm
        adapter_config.write_text(json.dumps(settings, indent=2) + "\n")
        llm = llm.get_base_model()
    if save_llm:
        llm.save_pretrained(out / "llm", safe_serialization=True)
        processor.tokenizer.save_pretrained(out / "llm")


def refuse_pickles(directory: Path) -> None:
    found = [p.name for p in directory.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if found:
        raise ValueError(
            f"{directory} contains pickle files ({', '.join(sorted(found)[:3])}); they can run arbitrary code "
            "and are never loaded. Remove them or convert them to safetensors."
        )


def load_checkpoint(directory, *, quantize=None, device_map=None, llm_override: str | None = None):
    """Load one of our checkpoints -> (model, processor)."""
    directory = Path(directory)
    refuse_pickles(directory)
    config = ModelConfig.load(directory)
    config.vision.pretrained = None  # the weights are here, not where the tower first came from
    llm_source = str(directory / "llm") if (directory / "llm").is_dir() else (llm_override or config.llm)
    if (directory / "llm").is_dir():
        refuse_pickle_only(directory / "llm")
    llm, tokenizer = load_llm(llm_source, quantize=quantize, device_map=device_map)
    image_processor = AutoImageProcessor.from_pretrained(directory)
    template = directory / TEMPLATE_NAME
    model, processor = build_model(config, llm=llm, tokenizer=tokenizer, image_processor=image_processor,
                                   chat_template=template.read_text() if template.is_file() else None)
    model.vision_tower.model.load_state_dict(load_file(str(directory / "vision_tower.safetensors")))
    model.projector.load_state_dict(load_file(str(directory / "projector.safetensors")))
    if (directory / "adapter").is_dir():
        from peft import PeftModel

        model.llm = PeftModel.from_pretrained(model.llm, str(directory / "adapter"), is_trainable=False)
    model.eval()
    return model, processor


def _embeddings_adapted(llm) -> bool | str:
    """peft's `save_embedding_layers`: "auto" where the adapter targets embedding layers, otherwise False. peft's
    "auto" would otherwise look the base model up on the hub at every save to see whether the vocabulary grew
    (a network call, and a warning offline); the embeddings a loader resizes are resized again when it loads."""
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    targets = llm.peft_config[llm.active_adapter].target_modules or ()
    return "auto" if not isinstance(targets, str) and any(n in targets for n in EMBEDDING_LAYER_NAMES) else False
