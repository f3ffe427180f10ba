"""The starting model's skills before and after a fine-tune, so forgetting shows in numbers.

Measured on held-out data of the model's own kind (finetune/replay.py: the default model's held-out scenes and
easy-VQA test questions, or a slice of a replay file) and, for the default model, plain questions whose answers
name a known word. Written to skills.json and printed as a table at the end of the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from assistant.inference.engine import Engine
from assistant.inference.generation import GenerationConfig

from .dataset import InstructionDataset
from .evaluate import evaluate
from .replay import ReplayData

# Plain questions none of the training data asks, each with words a right answer contains.
TEXT_QUESTIONS = [
    ("What is the capital of France?", ("paris",)),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What color is grass?", ("green",)),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("What do bees make?", ("honey",)),
    ("What is frozen water called?", ("ice",)),
    ("How many hours are in a day?", ("24", "twenty-four", "twenty four")),
    ("What is the capital of Italy?", ("rome",)),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What do you call a baby cat?", ("kitten",)),
]
FORGETTING_POINTS = 5.0  # an accuracy drop larger than this is called out


@torch.no_grad()
def check_skills(model, processor, replay: ReplayData, max_length: int) -> dict:
    """{skill: {"accuracy": %, "loss": held-out loss}}; the text questions also give their mean answer length."""
    was_training = model.training
    model.eval()
    skills = {}
    for name, (samples, roots) in replay.skill_sets.items():
        metrics = evaluate(model, processor, InstructionDataset(samples, roots, processor, max_length))
        skills[name] = {"accuracy": metrics.get("vqa_accuracy"), "loss": metrics["loss"]}
    if replay.text_questions:
        engine = Engine(model, processor)
        conversations = [[{"role": "user", "content": [{"type": "text", "text": q}]}] for q, _ in TEXT_QUESTIONS]
        answers = []
        for start in range(0, len(conversations), 6):
            answers += engine.answer_batch(conversations[start:start + 6], [[]] * len(conversations[start:start + 6]),
                                           GenerationConfig(max_new_tokens=48))
        right = [any(w in a.lower() for w in words) for a, (_, words) in zip(answers, TEXT_QUESTIONS)]
        skills["text questions"] = {"accuracy": 100 * sum(right) / len(right),
                                    "mean_words": sum(len(a.split()) for a in answers) / len(answers),
                                    "answers": answers}
    model.train(was_training)
    return skills


def save_skills(path: Path, before: dict, after: dict | None = None) -> None:
    path.write_text(json.dumps({"before": before, "after": after}, indent=2))


def load_before(path: Path) -> dict | None:
    """The check made before training (kept across a resume: the model it described is gone by then)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("before")
    except (json.JSONDecodeError, AttributeError):
        return None


def report(before: dict, after: dict, replayed: bool) -> str:
    """A table of each skill before and after, and a warning where one dropped."""
    rows = [("skill", "before", "after")]
    dropped = []
    for name in before:
        b, a = before[name], after.get(name, {})
        if b.get("accuracy") is not None:
            rows.append((name, f"{b['accuracy']:.1f}%", f"{a.get('accuracy', float('nan')):.1f}%"))
            if a.get("accuracy") is not None and b["accuracy"] - a["accuracy"] > FORGETTING_POINTS:
                dropped.append(f"{name} {b['accuracy']:.1f}% -> {a['accuracy']:.1f}%")
        else:
            rows.append((f"{name} (loss)", f"{b['loss']:.3f}", f"{a.get('loss', float('nan')):.3f}"))
        if "mean_words" in b:
            rows.append(("  mean answer length (words)", f"{b['mean_words']:.1f}", f"{a.get('mean_words', 0):.1f}"))
    width = max(len(r[0]) for r in rows) + 2
    lines = ["the starting model's skills (held-out data of its own kind):"]
    lines += [f"  {r[0]:<{width}}{r[1]:>8}{r[2]:>8}" for r in rows]
    if dropped:
        advice = ("raise data.replay_share" if replayed else
                  "mix its own kind of data back in: data.replay=default (the default model's) or data.replay=FILE")
        lines.append(f"the model forgot part of what it knew ({'; '.join(dropped)}): {advice}")
    return "\n".join(lines)
