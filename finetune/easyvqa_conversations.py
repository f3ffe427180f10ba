"""Convert easy-VQA's train split to our training format: one image, all its questions as a
multi-turn conversation (LLaVA's short-answer prompt after each question).

    python -m finetune.easyvqa_conversations --out data/easyvqa_train.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

from assistant.vqa.easy_vqa import image_root, questions

SHORT = "Answer the question using a single word or phrase."


def convert(out: Path, split: str = "train", max_turns: int = 12, seed: int = 0) -> int:
    if split != "train":
        raise ValueError("only easy-VQA's train split may be used for training")
    per_image = defaultdict(list)
    for q in questions(split):
        per_image[q["image"]].append(q)
    rng = random.Random(seed)
    n = 0
    with open(out, "w") as f:
        for image, qs in sorted(per_image.items()):
            rng.shuffle(qs)
            for start in range(0, len(qs), max_turns):
                turns = []
                for q in qs[start:start + max_turns]:
                    text = q["question"][0].upper() + q["question"][1:]
                    turns += [{"from": "human", "value": f"{text}\n{SHORT}"}, {"from": "gpt", "value": q["answer"]}]
                turns[0]["value"] = "<image>\n" + turns[0]["value"]
                f.write(json.dumps({"id": f"easyvqa-{image}-{start}", "image": image, "conversations": turns}) + "\n")
                n += 1
    return n


COLOURS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
SHAPES = {"circle", "rectangle", "triangle"}


def captions(out_captions: Path, out_align: Path) -> int:
    """A caption per train image ('A teal circle.'), read off its colour and shape answers."""
    seen = defaultdict(dict)
    for q in questions("train"):
        a = q["answer"]
        if a in COLOURS and ("color" in q["question"] or "colour" in q["question"]):
            seen[q["image"]]["colour"] = a
        elif a in SHAPES and "shape" in q["question"] and "color" not in q["question"]:
            seen[q["image"]]["shape"] = a
    n = 0
    with open(out_captions, "w") as cap_f, open(out_align, "w") as align_f:
        for image, facts in sorted(seen.items()):
            if len(facts) < 2:
                continue
            cap = f"A {facts['colour']} {facts['shape']}."
            cap_f.write(json.dumps({"id": f"easyvqa-{image}", "image": image, "caption": cap}) + "\n")
            align_f.write(json.dumps({"id": f"easyvqa-{image}", "image": image, "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": cap}]}) + "\n")
            n += 1
    return n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m finetune.easyvqa_conversations", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="multi-turn conversations (JSONL)")
    p.add_argument("--captions", help="also write one caption per image here (stage 0 data)")
    p.add_argument("--align", help="also write caption conversations here (stage 1 data)")
    args = p.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    n = convert(Path(args.out))
    print(f"wrote {n} conversations to {args.out}; image root: {image_root('train')}")
    if args.captions and args.align:
        n = captions(Path(args.captions), Path(args.align))
        print(f"wrote {n} captions to {args.captions} and {args.align}")


if __name__ == "__main__":
    main()
