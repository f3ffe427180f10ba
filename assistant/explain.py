"""Where the model looked: for an answer already given, how much each image position mattered to it, and how
much the answer relied on the image at all.

The map is over the vision tower's patch grid, the image positions every projector reads (a linear or MLP
projector keeps one LLM position per patch; a Q-Former mixes them into its queries, so the map is taken before it).
Methods, compared by benchmarks/pointing_game.py:
- "gradient" (default): the size (L2 norm) of the gradient of the answer's log-probability with respect to each
  patch's vision features: how strongly the answer responds to what is at that patch. One forward and one
  backward pass. (Measured against gradient x input, at the vision features, the projector's output and the
  pixels, it found the object asked about most often.)
- "occlusion": each patch's features replaced by the image's mean feature; the drop of the answer's
  log-probability. One forward pass per patch (batched).
Image reliance: the answer's log-probability per token with the images, and with each image replaced by a blank
one (mid grey); the difference says how much the answer depended on seeing the image.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from .inputs.chat_format import IGNORE_INDEX

METHODS = ("gradient", "occlusion")
# Per-token log-probability drops (nats) above which an answer is said to depend strongly / somewhat on the image.
STRONG_RELIANCE = 1.0
SOME_RELIANCE = 0.2


@dataclass
class Explanation:
    maps: list[torch.Tensor]  # per image: (rows, cols), non-negative, summing to 1 (all zero: nothing mattered)
    answer_logprob: float  # mean log-probability of the answer's tokens, with the images
    blank_logprob: float | None = None  # the same with every image blank
    method: str = "gradient"
    seconds: float = 0.0
    answer_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def reliance(self) -> float | None:
        """How much less likely (nats per token) the answer is without the images."""
        return None if self.blank_logprob is None else self.answer_logprob - self.blank_logprob

    def reliance_words(self) -> str:
        r = self.reliance
        if r is None:
            return ""
        if r >= STRONG_RELIANCE:
            return "This answer depended strongly on the image."
        if r >= SOME_RELIANCE:
            return "This answer depended somewhat on the image."
        return "This answer hardly depended on the image."

    def peak(self, image: int = 0) -> tuple[int, int]:
        """(row, col) of the map's maximum."""
        m = self.maps[image]
        index = int(m.reshape(-1).argmax())
        return divmod(index, m.shape[1])

    def to_dict(self) -> dict:
        return {"method": self.method, "maps": [m.tolist() for m in self.maps],
                "answer_logprob": self.answer_logprob, "blank_logprob": self.blank_logprob,
                "reliance": self.reliance, "reliance_words": self.reliance_words(), "seconds": self.seconds}


def explain(model, processor, messages: list[dict], images: list, answer: str, *, method: str = "gradient",
            reliance: bool = True) -> Explanation:
    """Explain `answer` as the reply to `messages` (our typed conversation, ending with the user's turn) over
    `images` (as the conversation places them)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if not images:
        raise ValueError("there is no image to explain the answer over")
    start = time.time()
    ids, answer_mask = _answer_ids(processor, messages, images, answer)
    pixels = processor.preprocess_images(images).to(model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = model.vision_tower(pixels)  # (images, positions, channels)
        notes = []
        maps = _gradient(model, ids, answer_mask, features) if method == "gradient" else None
        if maps is None and method == "gradient":  # a runtime whose layers pass no gradient to their input
            notes.append("this runtime passes no gradient: mapped by occlusion instead")
            method = "occlusion"
        if maps is None:
            maps = _occlusion(model, ids, answer_mask, features)
        maps, logprob = maps
        blank = None
        if reliance:
            blank_images = [Image.new("RGB", im.size, (128, 128, 128)) for im in _as_pil(images)]
            with torch.no_grad():
                blank_features = model.vision_tower(processor.preprocess_images(blank_images).to(model.device))
                blank = float(_answer_logprobs(model, ids, answer_mask, blank_features).mean())
    finally:
        model.train(was_training)
    grids = [_to_grid(m, model.vision_tower) for m in maps]
    return Explanation(grids, logprob, blank, method, time.time() - start, int(answer_mask.sum()), notes)


def _as_pil(images):
    from .inputs.images import load_image

    return [load_image(im) for im in images]


def _answer_ids(processor, messages, images, answer):
    """The conversation with the answer as the last assistant turn; a mask of the answer's label positions."""
    prompt = processor.encode(messages, images).input_ids
    full = processor.encode(messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                            images, add_generation_prompt=False, with_labels=True)
    labels = torch.tensor(full.labels)
    mask = labels != IGNORE_INDEX
    mask[:len(prompt)] = False  # earlier replies are not this answer
    ids = torch.tensor(full.input_ids)
    special = torch.tensor(sorted(processor.tokenizer.all_special_ids))
    words = mask & ~torch.isin(ids, special)  # the end token says little about the image and would dilute it
    if words.any():
        mask = words
    if not mask.any():
        raise ValueError("the answer has no tokens to explain")
    return ids[None], mask


def _answer_logprobs(model, ids, answer_mask, features, batch: int = 1) -> torch.Tensor:
    """Log-probability of each answer token, (batch, answer tokens), for `batch` sets of the images' features."""
    projected = model.projector(features.to(next(model.projector.parameters()).dtype)).to(model.dtype)
    embeds = model.embed(ids.expand(batch, -1).to(model.device), projected)
    logits = model.llm(inputs_embeds=embeds).logits.float()
    targets = ids[0, 1:].to(logits.device)
    positions = answer_mask[1:].nonzero().squeeze(-1).to(logits.device)
    logp = torch.log_softmax(logits[:, :-1][:, positions], dim=-1)
    return logp.gather(-1, targets[positions].expand(batch, -1).unsqueeze(-1)).squeeze(-1)


def _gradient(model, ids, answer_mask, features):
    features = features.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logp = _answer_logprobs(model, ids, answer_mask, features)
        if not logp.requires_grad:
            return None
        logp.sum().backward()
    if features.grad is None:
        return None
    relevance = features.grad.norm(dim=-1)  # (images, positions)
    return list(relevance.float()), float(logp.detach().mean())


def _occlusion(model, ids, answer_mask, features, batch_size: int = 12):
    n_images, positions, _ = features.shape
    with torch.no_grad():
        base = float(_answer_logprobs(model, ids, answer_mask, features).sum())
        drops = torch.zeros(n_images, positions)
        variants = [(i, p) for i in range(n_images) for p in range(positions)]
        for start in range(0, len(variants), batch_size):
            chunk = variants[start:start + batch_size]
            occluded = features.repeat(len(chunk), 1, 1).reshape(len(chunk), n_images, positions, -1)
            for k, (i, p) in enumerate(chunk):
                occluded[k, i, p] = features[i].mean(0)
            logp = _answer_logprobs(model, ids, answer_mask, occluded.reshape(len(chunk) * n_images, positions, -1),
                                    batch=len(chunk))
            for k, (i, p) in enumerate(chunk):
                drops[i, p] = base - float(logp[k].sum())
    return list(drops.clamp(min=0)), base / int(answer_mask.sum())


def _to_grid(relevance: torch.Tensor, vision_tower) -> torch.Tensor:
    """Positions -> the patch grid (a class token, where the features keep one, is left out), summing to 1."""
    relevance = relevance.detach().float().cpu()
    patches = vision_tower.num_patches
    if relevance.numel() == patches + 1:
        relevance = relevance[1:]
    side = int(math.isqrt(patches))
    grid = relevance[:patches].reshape(side, side)
    total = grid.sum()
    return grid / total if total > 0 else grid


def heatmap(image, relevance: torch.Tensor) -> Image.Image:
    """The image with the map laid over it in red (stronger where the answer depended more on that patch)."""
    from .inputs.images import load_image

    image = load_image(image).convert("RGB")
    peak = float(relevance.max())
    weights = (relevance / peak if peak > 0 else relevance).clamp(0, 1)
    mask = Image.fromarray((weights.numpy() * 255).astype("uint8"), mode="L").resize(image.size, Image.BILINEAR)
    red = Image.new("RGB", image.size, (230, 20, 20))
    shaded = Image.blend(image, Image.new("RGB", image.size, (0, 0, 0)), 0.35)  # dim what did not matter
    return Image.composite(red, shaded, mask.point(lambda v: int(v * 0.75))).convert("RGB") \
        if peak > 0 else image


def png_data_url(image: Image.Image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
