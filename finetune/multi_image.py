"""Conversations over two or three drawn scenes that name each image ("Image 1:", "Image 2:") the way the chat
does (server/conversation.py), so that the default model learns that "Image 2" and "the second image" point at
one of several images. Questions name an image, compare the images, or come with a newly attached image and are
about that one. Where possible a question is one whose answer differs between the images, so that answering
about the wrong image is wrong.

    python -m finetune.multi_image --out data/multi_image --train 3000 --test 200
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from .scenes import SHORT, Thing, caption, output_folder, render, sample_scene

ORDINALS = ["first", "second", "third"]


def label(j: int) -> str:
    return f"Image {j + 1}"


def named(j: int, rng: random.Random) -> str:
    """How a question names image j: "Image 2" or "the second image"."""
    return label(j) if rng.random() < 0.7 else f"the {ORDINALS[j]} image"


def about_one(things: list[Thing]) -> list[tuple[str, str, str]]:
    """(kind, question with {where} for the image's name, answer) about one scene."""
    qs = [("count", "How many objects are in {where}?", str(len(things)))]
    for t in things:
        if sum(o.shape == t.shape for o in things) == 1:
            qs.append(("colour", f"What color is the {t.shape} in {{where}}?", t.colour))
        if sum(o.colour == t.colour for o in things) == 1:
            qs.append(("shape", f"What shape is the {t.colour} object in {{where}}?", t.shape))
        qs.append(("exist", f"Is there a {t.colour} {t.shape} in {{where}}?", "yes"))
    return qs


def answer_in(question: str, things: list[Thing]) -> str | None:
    """The answer the same question would have about another scene (None: not defined there)."""
    return {q: a for _, q, a in about_one(things)}.get(question, "no" if question.startswith("Is there") else None)


def questions(scenes: list[list[Thing]], rng: random.Random) -> list[tuple[str, int | None, str, str]]:
    """(kind, image asked about or None for a comparison, question, answer), contrastive ones first."""
    out = []
    for j, things in enumerate(scenes):
        others = [s for k, s in enumerate(scenes) if k != j]
        for kind, q, a in about_one(things):
            if kind == "exist" and rng.random() < 0.5:  # the absent case: present elsewhere, not here
                present = [t for s in others for t in s if (t.colour, t.shape) not in {(o.colour, o.shape)
                                                                                      for o in things}]
                if not present:
                    continue
                t = rng.choice(present)
                q, a = f"Is there a {t.colour} {t.shape} in {{where}}?", "no"
            differs = any(answer_in(q, s) not in (None, a) for s in others)
            out.append((differs, kind, j, q, a))
    kinds = {(t.colour, t.shape) for s in scenes for t in s}
    for colour, shape in sorted(kinds):
        holders = [j for j, s in enumerate(scenes) if any((t.colour, t.shape) == (colour, shape) for t in s)]
        if len(holders) == 1:
            out.append((True, "which", None, f"Which image has a {colour} {shape}?", label(holders[0])))
    counts = [len(s) for s in scenes]
    if len(scenes) == 2 and counts[0] != counts[1]:
        out.append((True, "which", None, "Which image has more objects?", label(counts.index(max(counts)))))
    rng.shuffle(out)
    out.sort(key=lambda q: not q[0])  # contrastive questions first, in random order
    return [(kind, j, q, a) for _, kind, j, q, a in out]


def draw_scenes(split: str, seed: int, i: int) -> tuple[random.Random, list[list[Thing]]]:
    """Conversation i's scenes (two, or three in a quarter of them) and the random state that goes on from them."""
    rng = random.Random(f"{seed}-multi-{split}-{i}")
    n = 3 if rng.random() < 0.25 else 2
    return rng, [sample_scene(rng, "train" if split == "train" else "test") for _ in range(n)]


def conversation(split: str, seed: int, image_dir: Path, i: int, max_turns: int = 8):
    """Conversation i of a split -> (conversation line, questions lines). Either every image comes with the first
    message, or each comes with a later message whose question is about it (as a person adds images in a chat)."""
    rng, scenes = draw_scenes(split, seed, i)
    n = len(scenes)
    names = []
    for j, things in enumerate(scenes):
        name = f"multi-{split}/{i:06d}-{j}.png"
        (image_dir / name).parent.mkdir(parents=True, exist_ok=True)
        render(things, rng).save(image_dir / name)
        names.append(name)
    asked = questions(scenes, rng)[:max_turns]
    turns = []
    attach_later = rng.random() < 0.4
    if attach_later:  # image j arrives with a question about it, unnamed: "this" image is the new one
        for j, things in enumerate(scenes):
            kind, q, a = rng.choice(about_one(things))
            turns.append((f"{label(j)}:<image>\n", q.replace(" in {where}", " in this image"), a, kind, j))
    for kind, j, q, a in asked[:max_turns - len(turns)]:
        intro = "" if turns else "".join(f"{label(k)}:<image>\n" for k in range(n))  # every image, first message
        text = q.replace("{where}", named(j, rng)) if j is not None else q
        turns.append((intro, text, a, kind, j))
    if rng.random() < 0.3:  # a description of one named image
        j = rng.randrange(n)
        turns.append(("", f"Describe {named(j, rng)}.", caption(scenes[j]), "describe", j))
    lines, question_rows = [], []
    for k, (intro, text, answer, kind, j) in enumerate(turns):
        short = "" if kind == "describe" else f"\n{SHORT}"
        lines += [{"from": "human", "value": f"{intro}{text}{short}"}, {"from": "gpt", "value": answer}]
        question_rows.append({"question_id": f"multi-{split}-{i}-{k}", "images": names, "question": text,
                              "answer": answer, "question_type": kind, "image_asked": j})
    record = {"id": f"multi-{split}-{i}", "image": names, "conversations": lines}
    return json.dumps(record) + "\n", "".join(json.dumps(r) + "\n" for r in question_rows)


def write_split(out: Path, split: str, count: int, seed: int) -> None:
    """<split>.jsonl (LLaVA conversations with an image list) and <split>_questions.jsonl, images under out/images."""
    with open(out / f"{split}.jsonl", "w") as conversations, open(out / f"{split}_questions.jsonl", "w") as rows:
        for i in range(count):
            line, questions_lines = conversation(split, seed, out / "images", i)
            conversations.write(line)
            rows.write(questions_lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m finetune.multi_image", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for option in ("train", "test"):
        if getattr(args, option) < 0:
            p.error(f"--{option} is a number of conversations: 0 or more, not {getattr(args, option)}")
    out = output_folder(p, args.out)
    write_split(out, "train", args.train, args.seed)
    write_split(out, "test", args.test, args.seed)
    print(f"wrote {args.train} train and {args.test} test conversations over several images to {out}")


if __name__ == "__main__":
    main()
