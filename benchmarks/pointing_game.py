"""The pointing game on held-out scenes: does the maximum of an answer's relevance map fall on the object the
question is about?

Scenes of the test split (new scenes of the training distribution, drawn with their objects' positions) give
questions about one object, "What color is the <shape>?" (the shape appears once) and "What shape is the <colour>
object?" (the colour appears once). For each, the model answers (greedy), `assistant.explain` maps the answer over
the patch grid, and the peak counts as a hit when its patch overlaps the object's box. Baselines from the same
questions: the centre patch, and a random patch. Image reliance is reported for these image questions against
text-only questions (the same questions with no image).

    python benchmarks/pointing_game.py [--model default] [--scenes 150] [--methods gradient,occlusion]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py: this folder is on the path when run as a script

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHORT = "Answer the question using a single word or phrase."


def questions_for(things):
    """(question, the object it is about) for each object named uniquely by its shape or its colour."""
    out = []
    shapes = [t.shape for t in things]
    colours = [t.colour for t in things]
    for t in things:
        if shapes.count(t.shape) == 1:
            out.append((f"What color is the {t.shape}?", t))
        if colours.count(t.colour) == 1 and len(things) > 1:
            out.append((f"What shape is the {t.colour} object?", t))
    return out


def hit(cell: tuple[int, int], thing, grid: int, image_size: int) -> bool:
    """Whether patch `cell` (row, col) overlaps the object's box."""
    from finetune.scenes import SIZES

    r = SIZES[thing.size]
    size = image_size / grid
    row, col = cell
    x0, y0 = col * size, row * size
    return x0 < thing.x + r and thing.x - r < x0 + size and y0 < thing.y + r and thing.y - r < y0 + size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--scenes", type=int, default=150)
    p.add_argument("--methods", default="gradient,occlusion")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=60, help="questions the methods after the first are run on (cost)")
    p.add_argument("--quantize", default="none", help="none: the plain model; int8 (or auto): the CPU runtime serve.py "
                   "runs by default")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results_pointing_game.json"))
    args = p.parse_args()

    import torch

    from assistant.explain import explain
    from assistant.inference.engine import Engine
    from assistant.inference.generation import GenerationConfig
    from assistant.weights.loading import load_for_inference
    from finetune.scenes import IMAGE_SIZE, render, sample_scene

    torch.manual_seed(0)
    model, processor, runtime = load_for_inference(args.model, quantize=args.quantize)
    engine = Engine(model, processor, runtime)
    grid = int(model.vision_tower.num_patches ** 0.5)
    rng = random.Random(args.seed)
    items = []
    for i in range(args.scenes):
        scene_rng = random.Random(f"pointing-{args.seed}-{i}")
        things = sample_scene(scene_rng, "test")
        image = render(things, scene_rng)
        for question, thing in questions_for(things):
            items.append((image, question, thing))
    rng.shuffle(items)
    methods = args.methods.split(",")
    hits = {m: 0 for m in methods}
    counted = {m: 0 for m in methods}
    seconds = {m: [] for m in methods}
    fell_back = {m: 0 for m in methods}
    centre_hits = random_hits = 0
    image_reliance, text_reliance = [], []
    for k, (image, question, thing) in enumerate(items):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{question}\n{SHORT}"}]}]
        answer = engine.answer_batch([messages], [[image]], GenerationConfig(max_new_tokens=8))[0]
        for method in methods:
            if method != methods[0] and k >= args.limit:
                continue
            counted[method] += 1
            e = explain(model, processor, messages, [image], answer, method=method, reliance=method == methods[0])
            hits[method] += hit(e.peak(), thing, grid, IMAGE_SIZE)
            fell_back[method] += e.method != method  # e.g. a runtime passing no gradient: occlusion instead
            seconds[method].append(e.seconds)
            if method == methods[0]:
                image_reliance.append(e.reliance)
        centre_hits += hit((grid // 2, grid // 2), thing, grid, IMAGE_SIZE)
        random_hits += hit((rng.randrange(grid), rng.randrange(grid)), thing, grid, IMAGE_SIZE)
        if (k + 1) % 25 == 0:
            print(f"{k + 1}/{len(items)}: " + ", ".join(f"{m} {100 * hits[m] / max(counted[m], 1):.1f}%"
                                                       for m in methods), flush=True)
    # text-only questions: the answer scored with a blank image against ... no image is needed: reliance of a
    # text answer is measured as for image questions, with the image present but not asked about
    text_questions = ["What is the capital of France?", "How many days are in a week?", "What do bees make?",
                      "What is the opposite of hot?", "Name a fruit that is red.", "What is 2 plus 2?"]
    for image, question in zip([it[0] for it in items], text_questions):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        answer = engine.answer_batch([messages], [[image]], GenerationConfig(max_new_tokens=24))[0]
        text_reliance.append(explain(model, processor, messages, [image], answer).reliance)
    n = len(items)
    result = {
        "model": args.model, "runtime": runtime.quantized or "plain", "scenes": args.scenes, "questions": n, "grid": f"{grid}x{grid}",
        "pointing_game": {m: 100 * hits[m] / counted[m] for m in methods},
        "questions_per_method": counted, "fell_back_to_another_method": fell_back,
        "baselines": {"centre": 100 * centre_hits / n, "random": 100 * random_hits / n},
        "seconds_per_explanation": {m: statistics.median(seconds[m]) for m in methods},
        "image_reliance_nats_per_token": {"image_questions_median": statistics.median(image_reliance),
                                          "text_questions_median": statistics.median(text_reliance)},
        "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))



if __name__ == "__main__":
    main()
