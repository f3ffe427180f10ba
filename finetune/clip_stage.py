"""Stage 0: contrastive CLIP pretraining (InfoNCE, transformers' CLIPModel) on image-caption pairs,
for domains where no pretrained CLIP exists. The output directory is a CLIPModel that later stages
name as their vision tower (`vision.pretrained`).

Recipe keys (`clip:` in the YAML): vision (CLIPVisionConfig kwargs), text (CLIPTextConfig kwargs),
image_size, tokenizer (an LLM spec whose tokenizer to use; default the bundled SmolLM2),
max_caption_tokens.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, get_cosine_schedule_with_warmup
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from assistant.devices import has_accelerator
from assistant.images import ImageError, load_image
from assistant.llm import resolve_llm_dir

from .config import TrainConfig
from .curves import plot_curves
from .data import DataError, read_records, resolve_image
from .trainer import micro_batches, seed_everything


def read_pairs(path, image_root) -> list[tuple[Path, str]]:
    """(image path, caption) from {"image", "caption"} lines or LLaVA samples (first reply = caption)."""
    records, errors = read_records(path)
    if errors:
        raise SystemExit("problems in the caption data:\n  " + "\n  ".join(map(str, errors[:20])))
    pairs = []
    for r in records:
        item = r.data
        if not isinstance(item, dict) or "image" not in item:
            raise SystemExit(f"{r.where}: expected an object with 'image' and 'caption'")
        cap = item.get("caption")
        if cap is None and "conversations" in item:
            cap = next((t["value"] for t in item["conversations"] if t.get("from") == "gpt"), None)
        if not cap:
            raise SystemExit(f"{r.where}: no caption")
        try:
            pairs.append((resolve_image(image_root, item["image"], r.where), cap))
        except DataError as e:
            raise SystemExit(str(e)) from None
    return pairs


def train_clip(cfg: TrainConfig, resume: bool = False) -> Path:
    t, c = cfg.train, cfg.clip
    seed_everything(t.seed)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    accelerator = Accelerator(gradient_accumulation_steps=t.grad_accum, cpu=not has_accelerator())
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_llm_dir(c.get("tokenizer", "smollm2-135m-instruct")))
    end_id = tokenizer.convert_tokens_to_ids(c.get("end_token", "<|endoftext|>"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    image_size = int(c.get("image_size", 96))
    vision = {"image_size": image_size, **c.get("vision", {})}
    # CLIP pools the text at the first end token; id 2 would select CLIP's legacy argmax rule.
    text = {"vocab_size": len(tokenizer), "max_position_embeddings": int(c.get("max_caption_tokens", 64)),
            "eos_token_id": end_id, "pad_token_id": pad_id, **c.get("text", {})}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=int(c.get("projection_dim", 128)))
    model = CLIPModel(config)
    images = LlavaImageProcessorPil(do_pad=True, do_center_crop=False, size={"height": image_size, "width": image_size},
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3)
    pairs = read_pairs(cfg.data.train, cfg.data.image_root)
    for path, image_root, repeat in cfg.data.extra_sources():
        pairs += read_pairs(path, image_root) * repeat
    per_epoch = math.ceil(len(pairs) / (t.batch_size * accelerator.num_processes))
    total = t.max_steps or max(1, math.ceil(per_epoch * t.epochs / t.grad_accum))
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(total * t.warmup_ratio), total)
    model, optimizer = accelerator.prepare(model, optimizer)
    max_tokens = text["max_position_embeddings"]
    log_file = out / "train_log.jsonl"
    started, step, micro = time.time(), 0, 0
    progress = tqdm(total=total, disable=not accelerator.is_main_process, desc="clip", dynamic_ncols=True)
    model.train()
    while step < total:
        epoch, k = divmod(micro, per_epoch)
        batch_ids = micro_batches(len(pairs), t.batch_size, accelerator.num_processes, accelerator.process_index,
                                  t.seed, epoch)[k]
        micro += 1
        pil, caps = [], []
        for i in batch_ids:
            try:
                pil.append(load_image(pairs[i][0]))
                caps.append(pairs[i][1])
            except ImageError as e:
                tqdm.write(f"skipping {pairs[i][0]}: {e}")
        if len(pil) < 2:
            continue
        ids = [tokenizer(cap, add_special_tokens=False).input_ids[:max_tokens - 1] + [end_id] for cap in caps]
        longest = max(map(len, ids))
        input_ids = torch.full((len(ids), longest), pad_id)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for j, seq in enumerate(ids):
            input_ids[j, :len(seq)], mask[j, :len(seq)] = torch.tensor(seq), 1
        pixel_values = images(images=pil, return_tensors="pt")["pixel_values"]
        with accelerator.accumulate(model):
            out_ = model(input_ids=input_ids.to(accelerator.device), attention_mask=mask.to(accelerator.device),
                         pixel_values=pixel_values.to(accelerator.device), return_loss=True)
            accelerator.backward(out_.loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or 1.0)
                optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        progress.update(1)
        if step % t.log_every == 0 or step == total:
            with torch.no_grad():
                acc = (out_.logits_per_image.argmax(-1) == torch.arange(len(pil), device=accelerator.device)).float().mean()
            entry = {"step": step, "loss": float(out_.loss), "in_batch_retrieval": float(acc),
                     "elapsed_s": time.time() - started}
            progress.set_postfix(loss=f"{entry['loss']:.3f}", r1=f"{entry['in_batch_retrieval']:.2f}")
            if accelerator.is_main_process:
                with open(log_file, "a") as f:
                    f.write(json.dumps(entry) + "\n")
        if t.max_minutes and (time.time() - started) / 60 >= t.max_minutes:
            tqdm.write(f"stopping after {t.max_minutes} minutes at step {step}")
            break
    progress.close()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        images.save_pretrained(out)
        plot_curves(log_file, out / "training_curves.png")
        print(f"CLIP written to {out}; use it as a vision tower with vision.pretrained: {out}")
    accelerator.wait_for_everyone()
    return out
