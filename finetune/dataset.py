"""Lazy training dataset and collation.

Images are read when a sample is used (in DataLoader workers when data.num_workers > 0); a bad
image found mid-training skips that sample (counted in the log), never crashes the run. Over-long
samples lose whole trailing turns, never part of an image's positions.
"""

from __future__ import annotations

import torch

from assistant.inputs.chat_format import IGNORE_INDEX
from assistant.inputs.images import ImageError, load_image

from .data import DataError, Sample, resolve_image


def fit_to_length(processor, messages: list[dict], max_length: int):
    """Encode with labels, dropping trailing user/assistant pairs until it fits.

    Returns (encoded, turns_dropped) or (None, turns_dropped) when even the first exchange is too long."""
    messages = list(messages)
    dropped = 0
    while True:
        encoded = processor.chat.encode(messages, add_generation_prompt=False, with_labels=True)
        if len(encoded.input_ids) <= max_length:
            return encoded, dropped
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if len(users) <= 1:
            return None, dropped
        messages = messages[:users[-1]]
        dropped += 1


class InstructionDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], image_roots: list, processor, max_length: int):
        self.samples = samples
        self.image_roots = image_roots  # one per sample (mixed files have their own roots)
        self.processor = processor
        self.max_length = max_length

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        encoded, dropped = fit_to_length(self.processor, sample.messages, self.max_length)
        if encoded is None:
            return {"skipped": "skipped_too_long", "error": f"{sample.where}: longer than data.max_length"}
        images = sample.images[:encoded.num_images]
        try:
            pil = [load_image(resolve_image(self.image_roots[index], p, sample.where), where=sample.where)
                   for p in images]
            pixel_values = self.processor.preprocess_images(pil) if pil else None
        except (ImageError, DataError) as e:
            return {"skipped": "skipped_bad_image", "error": str(e)}
        return {"input_ids": encoded.input_ids, "labels": encoded.labels, "pixel_values": pixel_values,
                "turns_truncated": dropped}


class Collator:
    """Right-padded batch; samples that were skipped (bad image, too long) are left out and counted in
    batch["skipped"] (the counts travel with the batch, since DataLoader workers have their own copy
    of the dataset). A batch whose samples were all skipped has only "skipped"."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, items):
        skipped = {"skipped_too_long": 0, "skipped_bad_image": 0, "last_error": None,
                   "turns_truncated": sum(it.get("turns_truncated", 0) for it in items)}
        for it in items:
            if "skipped" in it:
                skipped[it["skipped"]] += 1
                skipped["last_error"] = it["error"]
        items = [it for it in items if "skipped" not in it]
        if not items:
            return {"skipped": skipped}
        batch = self.processor.pad([it["input_ids"] for it in items], [it["labels"] for it in items])
        batch["skipped"] = skipped
        pixels = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        batch["num_label_tokens"] = int((batch["labels"] != IGNORE_INDEX).sum())
        return batch
