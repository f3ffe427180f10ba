"""Evaluation during training: held-out loss, and VQA accuracy where the answers are short."""

from __future__ import annotations

import torch

from assistant.inference.engine import Engine
from assistant.inference.generation import GenerationConfig
from assistant.inputs.images import ImageError, load_image
from assistant.vqa.metrics import vqa_accuracy

from .data import DataError, resolve_image
from .dataset import Collator

SHORT_ANSWER_WORDS = 3


@torch.no_grad()
def evaluate(model, processor, dataset, batch_size: int = 8, max_vqa: int = 200) -> dict:
    model.eval()
    collate = Collator(processor)
    losses, weights = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch.pop("skipped")
        if "input_ids" not in batch:  # every sample in it was skipped
            continue
        n = batch.pop("num_label_tokens")
        losses.append(float(model(**batch).loss) * n)
        weights.append(n)
    metrics = {"loss": sum(losses) / max(sum(weights), 1)}
    questions = _short_answer_questions(dataset, max_vqa)
    if questions:
        engine = Engine(model, processor)
        scores = []
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            answers = engine.answer_batch([q[0] for q in chunk], [q[1] for q in chunk],
                                          GenerationConfig(max_new_tokens=12))
            scores += [vqa_accuracy(a, [q[2]]) for a, q in zip(answers, chunk)]
        metrics["vqa_accuracy"] = 100 * sum(scores) / len(scores)
    return metrics


def _short_answer_questions(dataset, limit: int):
    """The first exchange of each held-out sample whose reply is a short answer."""
    out = []
    for sample, root in zip(dataset.samples, dataset.image_roots):
        messages = sample.messages
        start = 1 if messages[0]["role"] == "system" else 0
        if len(messages) < start + 2:
            continue
        reply = " ".join(p["text"] for p in messages[start + 1]["content"] if p["type"] == "text")
        if len(reply.split()) > SHORT_ANSWER_WORDS:
            continue
        question = messages[:start + 1]
        n_images = sum(p["type"] == "image" for m in question for p in m["content"])
        try:
            images = [load_image(resolve_image(root, p, sample.where)) for p in sample.images[:n_images]]
        except (ImageError, DataError):
            continue
        out.append((question, images, reply))
        if len(out) >= limit:
            break
    return out
