"""The processor: images -> pixel tensors, conversations -> token ids, batched and padded."""

from __future__ import annotations

import torch
from .chat_format import IGNORE_INDEX, ChatFormatter, ConversationError
from .images import load_image


class VLMProcessor:
    def __init__(self, image_processor, tokenizer, image_token: str, tokens_per_image: int, *,
                 chat_template: str | None = None, image_layout: str = "inline", source: str = "the LLM"):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.chat = ChatFormatter(tokenizer, image_token, tokens_per_image, chat_template=chat_template,
                                  image_layout=image_layout, source=source)

    @property
    def image_token_id(self) -> int:
        return self.chat.image_token_id

    def preprocess_images(self, images) -> torch.Tensor:
        """Images (anything `load_image` reads) -> (n, 3, H, W) float tensor."""
        pil = [load_image(im) for im in images]
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]

    def encode(self, messages, images=(), *, add_generation_prompt=True, with_labels=False):
        encoded = self.chat.encode(messages, add_generation_prompt=add_generation_prompt, with_labels=with_labels)
        if encoded.num_images != len(images):
            raise ConversationError(
                f"the conversation has {encoded.num_images} image placeholder(s) but {len(images)} image(s) were given"
            )
        return encoded

    def __call__(self, conversations, images=None, *, add_generation_prompt=True, with_labels=False,
                 padding_side="right") -> dict:
        """Batch of conversations (+ one list of images each) -> padded tensors."""
        images = images if images is not None else [[] for _ in conversations]
        if len(images) != len(conversations):
            raise ConversationError(f"{len(conversations)} conversations but {len(images)} image lists")
        encoded = [self.encode(c, ims, add_generation_prompt=add_generation_prompt, with_labels=with_labels)
                   for c, ims in zip(conversations, images)]
        batch = self.pad([e.input_ids for e in encoded], [e.labels for e in encoded] if with_labels else None,
                         padding_side)
        flat = [im for ims in images for im in ims]
        if flat:
            batch["pixel_values"] = self.preprocess_images(flat)
        return batch

    def pad(self, sequences, labels=None, padding_side="right") -> dict:
        longest = max(len(s) for s in sequences)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        lab = torch.full((len(sequences), longest), IGNORE_INDEX, dtype=torch.long) if labels else None
        for i, s in enumerate(sequences):
            sl = slice(0, len(s)) if padding_side == "right" else slice(longest - len(s), longest)
            ids[i, sl] = torch.tensor(s, dtype=torch.long)
            mask[i, sl] = 1
            if lab is not None:
                lab[i, sl] = torch.tensor(labels[i], dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": mask}
        if lab is not None:
            out["labels"] = lab
        return out
