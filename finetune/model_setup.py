"""Model set-up for a training stage: what is loaded, what is frozen, what gets LoRA."""

from __future__ import annotations

import torch

from assistant.model.builder import build_model
from assistant.model.config import ModelConfig
from assistant.cpu.policy import bf16_training_attention_pays_off, training_precision
from assistant.cpu.training_attention import use_for_training
from assistant.weights.loading import load_model

from .config import TrainConfig


def prepare_model(cfg: TrainConfig):
    """Load or build the model, then freeze / LoRA it as the recipe says -> (model, processor)."""
    quantize = cfg.train.quantize
    if quantize and not torch.cuda.is_available():
        print("note: bitsandbytes 4/8-bit layers run on this CPU but slowly; QLoRA is meant for CUDA GPUs")
    if cfg.model_config is not None:
        model, processor = build_model(ModelConfig.from_dict(cfg.model_config), quantize=quantize)
    else:
        model, processor = load_model(cfg.init or "default", quantize=quantize)
    model.config.trained = True
    model.config.vision.frozen = cfg.vision == "frozen"
    model.vision_tower.requires_grad_(cfg.vision == "full")
    model.projector.requires_grad_(cfg.projector == "full")
    model.llm = prepare_llm(model.llm, cfg)
    precision = training_precision(cfg.train.mixed_precision)
    if precision == "bf16" and not cfg.train.quantize:
        frozen_weights_in_bf16(model.llm)
    if bf16_training_attention_pays_off(precision, cfg.data.max_length):
        use_for_training(model.llm)
    if cfg.train.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


def frozen_weights_in_bf16(llm) -> None:
    """Under bf16 autocast every product converts its fp32 weight to bf16, at every step; the LLM's weights that do
    not train are stored in bf16 once instead (what autocast would make of them), so only the trained ones stay
    fp32 (their optimizer needs the precision). Not the vision tower's or the projector's: a checkpoint saves
    those whether they train or not."""
    for parameter in llm.parameters():
        if not parameter.requires_grad and parameter.dtype == torch.float32:
            parameter.data = parameter.data.to(torch.bfloat16)


def prepare_llm(llm, cfg: TrainConfig):
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if cfg.llm == "lora":
        if isinstance(llm, PeftModel):  # continue training the adapter the checkpoint already has
            own = llm.peft_config[llm.active_adapter]
            if (cfg.lora.r, cfg.lora.alpha) != (own.r, own.lora_alpha):
                print(f"note: continuing the model's own LoRA adapter (r={own.r}, alpha={own.lora_alpha}); the "
                      f"recipe's lora.r={cfg.lora.r}, lora.alpha={cfg.lora.alpha} apply to new adapters only")
            cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = own.r, own.lora_alpha, own.lora_dropout  # what runs
            for name, p in llm.named_parameters():
                p.requires_grad_("lora_" in name)
            return llm
        if cfg.train.quantize:
            llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
        return get_peft_model(llm, lora)
    if isinstance(llm, PeftModel):
        llm = llm.merge_and_unload()  # frozen or full training of an adapted model: fold the adapter in
    llm.requires_grad_(cfg.llm == "full")
    return llm


def parameter_groups(model, cfg: TrainConfig) -> list[dict]:
    t = cfg.train
    groups = [
        {"name": "llm", "params": [p for p in model.llm.parameters() if p.requires_grad], "lr": t.lr},
        {"name": "projector", "params": [p for p in model.projector.parameters() if p.requires_grad],
         "lr": t.projector_lr or t.lr},
        {"name": "vision", "params": [p for p in model.vision_tower.parameters() if p.requires_grad],
         "lr": t.vision_lr or t.lr / 10},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("config: nothing to train (vision, projector and llm are all frozen)")
    return groups
