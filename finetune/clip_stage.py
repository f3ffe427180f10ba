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
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, CLIPConfig, CLIPModel
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from assistant.inputs.images import ImageError, load_image
from assistant.weights.llm import resolve_llm_dir

from .config import TrainConfig
from .curves import plot_curves
from .data import DataError, read_records, resolve_image
from .schedule import TrainingClock, make_scheduler, out_of_time
from .trainer import epoch_batches, make_accelerator, micro_batches, seed_everything


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


class CaptionPairs(torch.utils.data.Dataset):
    """(image, caption) pairs read lazily; an unreadable image becomes a skip marker, never a crash."""

    def __init__(self, pairs, tokenizer, images, max_tokens: int, end_id: int):
        self.pairs, self.tokenizer, self.images = pairs, tokenizer, images
        self.max_tokens, self.end_id = max_tokens, end_id

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        path, caption = self.pairs[index]
        try:
            pixel_values = self.images(images=[load_image(path)], return_tensors="pt")["pixel_values"]
        except ImageError as e:
            return {"skipped": f"{path}: {e}"}
        ids = self.tokenizer(caption, add_special_tokens=False).input_ids[:self.max_tokens - 1] + [self.end_id]
        return {"pixel_values": pixel_values, "ids": ids}


class CaptionCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        skipped = [it["skipped"] for it in items if "skipped" in it]
        items = [it for it in items if "skipped" not in it]
        batch = {"skipped": skipped}
        if len(items) < 2:  # contrastive loss needs at least two pairs
            return batch
        longest = max(len(it["ids"]) for it in items)
        input_ids = torch.full((len(items), longest), self.pad_id)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for j, it in enumerate(items):
            input_ids[j, :len(it["ids"])], mask[j, :len(it["ids"])] = torch.tensor(it["ids"]), 1
        batch.update(input_ids=input_ids, attention_mask=mask,
                     pixel_values=torch.cat([it["pixel_values"] for it in items]))
        return batch


def train_clip(cfg: TrainConfig, resume: bool = False) -> Path:
    t, c = cfg.train, cfg.clip
    seed_everything(t.seed)
    accelerator = make_accelerator(t)
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
    clock = TrainingClock()
    scheduler = make_scheduler(optimizer, t, total, clock)
    model, optimizer = accelerator.prepare(model, optimizer)
    max_tokens = text["max_position_embeddings"]
    log_file = out / "train_log.jsonl"
    step, micro = 0, 0
    progress = tqdm(total=total, disable=not accelerator.is_main_process, desc="clip", dynamic_ncols=True)
    model.train()
    dataset = CaptionPairs(pairs, tokenizer, images, max_tokens, end_id)
    collate = CaptionCollator(pad_id)
    batch_iter, iter_epoch = None, None
    while step < total:
        epoch, k = divmod(micro, per_epoch)
        if iter_epoch != epoch:
            order = micro_batches(len(pairs), t.batch_size, accelerator.num_processes, accelerator.process_index,
                                  t.seed, epoch)[k:]
            batch_iter, iter_epoch = epoch_batches(dataset, collate, order, cfg.data.num_workers), epoch
        batch = next(batch_iter)
        micro += 1
        for problem in batch.pop("skipped"):
            tqdm.write(f"skipping {problem}")
        if "input_ids" not in batch:
            continue
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        with accelerator.accumulate(model):
            out_ = model(**batch, return_loss=True)
            accelerator.backward(out_.loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or 1.0)
                optimizer.step(), clock.tick(accelerator), scheduler.step(), optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        progress.update(1)
        if step % t.log_every == 0 or step == total:
            with torch.no_grad():
                n = len(out_.logits_per_image)
                acc = (out_.logits_per_image.argmax(-1) == torch.arange(n, device=accelerator.device)).float().mean()
            entry = {"step": step, "loss": float(out_.loss.detach()), "in_batch_retrieval": float(acc),
                     "lr": scheduler.get_last_lr()[0], "elapsed_s": clock.seconds()}
            progress.set_postfix(loss=f"{entry['loss']:.3f}", r1=f"{entry['in_batch_retrieval']:.2f}")
            if accelerator.is_main_process:
                with open(log_file, "a") as f:
                    f.write(json.dumps(entry) + "\n")
        if out_of_time(t, clock):
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
