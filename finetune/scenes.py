"""Synthetic scenes for the default model: shapes of several colours and sizes, with captions and
multi-turn questions (colour, shape, counting, existence, position, relations, largest/smallest,
description). Deterministic by seed. Three splits: train; test, new scenes of the training distribution;
compositions, scenes each holding at least one of the colour-shape pairs that never appear in train or test
(generalisation to unseen compositions). With --counting N, a fourth: count drills on scenes of the
training distribution (count_drill).

    python -m finetune.scenes --out data/scenes --train 6000 --test 600
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import multiprocessing
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 96
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 70, 220), "yellow": (240, 210, 20),
    "orange": (245, 130, 20), "purple": (130, 40, 170), "pink": (250, 140, 190), "brown": (120, 70, 30),
    "black": (20, 20, 20), "gray": (140, 140, 140),
}
SHAPES = ["circle", "square", "triangle", "star", "diamond", "cross"]
PLURALS = {"cross": "crosses"}  # the other shapes take an "s"
SIZES = {"small": 9, "large": 15}  # radius in pixels
# Never in train or test: only the compositions split draws them (generalisation to unseen compositions).
HELD_OUT_PAIRS = {("red", "star"), ("blue", "triangle"), ("green", "circle"), ("yellow", "cross"),
                  ("purple", "square"), ("orange", "diamond")}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]
SHORT = "Answer the question using a single word or phrase."


@dataclass
class Thing:
    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def draw_shape(d: ImageDraw.ImageDraw, t: Thing) -> None:
    r, x, y, fill = SIZES[t.size], t.x, t.y, COLOURS[t.colour]
    if t.shape == "circle":
        d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif t.shape == "square":
        s = r * 0.85
        d.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    elif t.shape == "triangle":
        d.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
    elif t.shape == "diamond":
        d.polygon([(x, y - r), (x + r * 0.75, y), (x, y + r), (x - r * 0.75, y)], fill=fill)
    elif t.shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((x + rr * math.cos(a), y + rr * math.sin(a)))
        d.polygon(pts, fill=fill)
    elif t.shape == "cross":
        w = r * 0.38
        d.rectangle([x - r, y - w, x + r, y + w], fill=fill)
        d.rectangle([x - w, y - r, x + w, y + r], fill=fill)


def sample_scene(rng: random.Random, split: str) -> list[Thing]:
    n = rng.randint(1, 6)
    things: list[Thing] = []
    attempts = 0
    while len(things) < n and attempts < 500:
        attempts += 1
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        # Held-out pairs appear only in the compositions split: the test split measures new scenes of the
        # training distribution, the compositions split (at least one held-out pair each) generalisation.
        if (colour, shape) in HELD_OUT_PAIRS and split != "compositions":
            continue
        size = rng.choice(list(SIZES))
        r = SIZES[size]
        x, y = rng.uniform(r + 2, IMAGE_SIZE - r - 2), rng.uniform(r + 2, IMAGE_SIZE - r - 2)
        if all(math.hypot(x - o.x, y - o.y) > r + SIZES[o.size] + 3 for o in things):
            things.append(Thing(shape, colour, size, x, y))
    if split == "compositions" and not any((t.colour, t.shape) in HELD_OUT_PAIRS for t in things):
        things[0].colour, things[0].shape = rng.choice(sorted(HELD_OUT_PAIRS))
    return things


def render(things: list[Thing], rng: random.Random) -> Image.Image:
    shade = rng.randint(235, 255)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (shade, shade, shade))
    d = ImageDraw.Draw(image)
    for t in things:
        draw_shape(d, t)
    return image


def where(t: Thing) -> str:
    h = "left" if t.x < IMAGE_SIZE / 3 else "right" if t.x > 2 * IMAGE_SIZE / 3 else "center"
    v = "top" if t.y < IMAGE_SIZE / 3 else "bottom" if t.y > 2 * IMAGE_SIZE / 3 else "middle"
    if h == "center" and v == "middle":
        return "in the center"
    if h == "center":
        return f"at the {v}"
    if v == "middle":
        return f"on the {h}"
    return f"at the {v} {h}"


def caption(things: list[Thing]) -> str:
    n = len(things)
    ordered = sorted(things, key=lambda t: (t.y > IMAGE_SIZE / 2, t.x))
    parts = [f"a {t.size} {t.colour} {t.shape} {where(t)}" for t in ordered]
    head = "There is one object" if n == 1 else f"There are {NUMBER_WORDS[n]} objects"
    return f"{head}: " + ", ".join(parts) + "."


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def count_all(things: list[Thing], rng: random.Random) -> tuple[str, str, str]:
    return "count", rng.choice(["How many objects are there?", "How many shapes are in the image?"]), str(len(things))


def count_shape(things: list[Thing], shape: str) -> tuple[str, str, str]:
    return "count", f"How many {plural(shape)} are there?", str(sum(t.shape == shape for t in things))


def count_colour(things: list[Thing], colour: str) -> tuple[str, str, str]:
    return "count", f"How many {colour} objects are there?", str(sum(t.colour == colour for t in things))


def questions(things: list[Thing], rng: random.Random) -> list[tuple[str, str, str]]:
    """(question type, question, answer) covering every type that this scene supports."""
    qs = []
    by_shape = {s: [t for t in things if t.shape == s] for s in SHAPES}
    by_colour = {c: [t for t in things if t.colour == c] for c in COLOURS}
    unique = [t for t in things if len(by_shape[t.shape]) == 1 or len(by_colour[t.colour]) == 1]
    for t in things:
        if len(by_shape[t.shape]) == 1:
            qs.append(("colour", rng.choice([f"What color is the {t.shape}?", f"What is the color of the {t.shape}?"]),
                       t.colour))
        if len(by_colour[t.colour]) == 1:
            qs.append(("shape", rng.choice([f"What shape is the {t.colour} object?",
                                            f"Which shape is {t.colour}?"]), t.shape))
    qs.append(count_all(things, rng))
    qs.append(count_shape(things, rng.choice(SHAPES)))
    qs.append(count_colour(things, rng.choice(list(COLOURS))))
    # existence: one present, one absent (often a near miss: a present shape in another colour)
    present = rng.choice(things)
    qs.append(("exist", f"Is there a {present.colour} {present.shape}?", "yes"))
    names = {(t.colour, t.shape) for t in things}
    for _ in range(20):
        colour = rng.choice(list(COLOURS))
        shape = present.shape if rng.random() < 0.5 else rng.choice(SHAPES)
        if (colour, shape) not in names:
            qs.append(("exist", f"Is there a {colour} {shape}?", "no"))
            break
    for t in unique:
        ref = t.shape if len(by_shape[t.shape]) == 1 else f"{t.colour} object"
        if abs(t.x - IMAGE_SIZE / 2) > 12:
            qs.append(("position", f"Is the {ref} on the left or the right?", "left" if t.x < IMAGE_SIZE / 2 else "right"))
        if abs(t.y - IMAGE_SIZE / 2) > 12:
            qs.append(("position", f"Is the {ref} at the top or the bottom?", "top" if t.y < IMAGE_SIZE / 2 else "bottom"))
    named = [t for t in things if (t.colour, t.shape) in {(o.colour, o.shape) for o in things}
             and sum((o.colour, o.shape) == (t.colour, t.shape) for o in things) == 1]
    if len(named) >= 2:
        a, b = rng.sample(named, 2)
        if abs(a.x - b.x) > 10:
            qs.append(("relation", f"Is the {a.name} to the left of the {b.name}?", "yes" if a.x < b.x else "no"))
        if abs(a.y - b.y) > 10:
            qs.append(("relation", f"Is the {a.name} above the {b.name}?", "yes" if a.y < b.y else "no"))
    large = [t for t in things if t.size == "large"]
    small = [t for t in things if t.size == "small"]
    if len(large) == 1 and small:
        qs.append(("size", rng.choice(["What color is the largest object?", "What color is the biggest shape?"]),
                   large[0].colour))
        qs.append(("size", "What shape is the largest object?", large[0].shape))
    if len(small) == 1 and large:
        qs.append(("size", "What color is the smallest object?", small[0].colour))
        qs.append(("size", "What shape is the smallest object?", small[0].shape))
    return qs


def count_drill(things: list[Thing], rng: random.Random) -> list[tuple[str, str, str]]:
    """The "counting" split's questions: every shape's count, the total and a present colour's count.
    Counting one shape among others is the default model's weakest skill, and in the ordinary questions the
    counted shape is drawn among all six, so most of those answers are 0."""
    return [count_shape(things, s) for s in SHAPES] + [count_all(things, rng),
                                                       count_colour(things, rng.choice(things).colour)]


def make_sample(index: int, split: str, seed: int, image_dir: Path, max_turns: int = 12):
    rng = random.Random(f"{seed}-{split}-{index}")
    things = sample_scene(rng, split)
    image = render(things, rng)
    name = f"{split}/{index:06d}.png"
    (image_dir / split).mkdir(parents=True, exist_ok=True)
    image.save(image_dir / name)
    qs = count_drill(things, rng) if split == "counting" else questions(things, rng)
    rng.shuffle(qs)
    qs = qs[:max_turns]
    return things, name, qs


def scene_lines(split: str, seed: int, image_dir: Path, i: int) -> tuple[str, str, str, str]:
    """Scene i of a split: draws its image and returns its (conversation, caption, align, questions) lines.
    Each scene depends only on (seed, split, i), so any number of worker processes give the same files."""
    things, name, qs = make_sample(i, split, seed, image_dir)
    cap = caption(things)
    rng = random.Random(f"{seed}-{split}-{i}-conv")
    turns = []
    describe_at = rng.randint(0, len(qs)) if rng.random() < 0.25 else None
    for k, (_, q, a) in enumerate(qs):
        if k == describe_at:
            turns += [{"from": "human", "value": rng.choice(["Describe the image.", "What do you see?"])},
                      {"from": "gpt", "value": cap}]
        turns += [{"from": "human", "value": f"{q}\n{SHORT}"}, {"from": "gpt", "value": a}]
    if describe_at == len(qs):
        turns += [{"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": cap}]
    turns[0]["value"] = "<image>\n" + turns[0]["value"]
    conversation = json.dumps({"id": f"{split}-{i}", "image": name, "conversations": turns}) + "\n"
    cap_line = json.dumps({"id": f"{split}-{i}", "image": name, "caption": cap}) + "\n"
    align = json.dumps({"id": f"{split}-{i}", "image": name, "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": cap}]}) + "\n"
    questions = "".join(json.dumps({"question_id": f"{split}-{i}-{k}", "image": name, "question": q, "answer": a,
                                    "question_type": qtype}) + "\n" for k, (qtype, q, a) in enumerate(qs))
    return conversation, cap_line, align, questions


def write_split(out: Path, split: str, count: int, seed: int, workers: int = 1) -> None:
    """Writes <split>.jsonl (multi-turn LLaVA conversations), <split>_captions.jsonl (stage 0),
    <split>_align.jsonl (stage 1) and <split>_questions.jsonl (one question per line, for assistant.vqa)."""
    make = functools.partial(scene_lines, split, seed, out / "images")
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(out / f"{split}{suffix}.jsonl", "w"))
                 for suffix in ("", "_captions", "_align", "_questions")]
        pool = stack.enter_context(multiprocessing.Pool(workers)) if workers > 1 else None
        produced = pool.imap(make, range(count), chunksize=64) if pool else map(make, range(count))
        for lines in produced:
            for f, line in zip(files, lines):
                f.write(line)


def output_folder(parser: argparse.ArgumentParser, out: str) -> Path:
    """The generators' --out, made if missing; one that cannot be a folder is a usage error naming it."""
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {folder}: cannot make the folder ({e.strerror})")
    return folder


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m finetune.scenes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--test", type=int, default=600, help="held-out scenes (test) and held-out compositions")
    p.add_argument("--counting", type=int, default=0,
                   help="scenes of count drills (counting.jsonl: every shape's count, the total, a colour's count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes drawing scenes (same files for any number)")
    args = p.parse_args(argv)
    for option in ("train", "test", "counting"):
        if getattr(args, option) < 0:
            p.error(f"--{option} is a number of scenes: 0 or more, not {getattr(args, option)}")
    if args.workers < 1:
        p.error(f"--workers must be at least 1, not {args.workers}")
    out = output_folder(p, args.out)
    splits = [("train", args.train), ("test", args.test), ("compositions", args.test)]
    for split, count in splits + ([("counting", args.counting)] if args.counting else []):
        write_split(out, split, count, args.seed, args.workers)
    print(f"wrote {args.train} train, {args.test} test and {args.test} held-out-composition scenes"
          f"{f', {args.counting} count drills' if args.counting else ''} to {out}")


if __name__ == "__main__":
    main()
