"""Does the model answer about the image a question names? Conversations over two or three held-out scenes
(finetune/multi_image.py, test split), every question asked after the conversation's true earlier turns, in the
layout the chat sends ("Image 1:<image> Image 2:<image> ..."), greedy. Prints one JSON line: accuracy overall, by
question kind, and how often an answer about a named image was instead right for another image.

    python benchmarks/multi_image.py [--model default] [--conversations 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_name  # noqa: E402

from assistant.inference.engine import ChatSession, Engine  # noqa: E402
from assistant.inference.generation import GenerationConfig  # noqa: E402
from assistant.weights.loading import load_for_inference  # noqa: E402
from finetune.data import RawRecord, parse_record  # noqa: E402
from finetune.multi_image import ORDINALS, answer_in, draw_scenes, label, write_split  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--conversations", type=int, default=100)
    p.add_argument("--quantize", default="auto")
    args = p.parse_args(argv)
    model, processor, runtime = load_for_inference(args.model, quantize=args.quantize)
    engine = Engine(model, processor, runtime)
    config = GenerationConfig(max_new_tokens=8)
    hits, by_kind, other_image, named = 0, defaultdict(list), 0, 0
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_split(out, "test", args.conversations, seed=0)
        rows = [json.loads(line) for line in (out / "test_questions.jsonl").read_text().splitlines()]
        records = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
        by_id = {r["id"]: parse_record(RawRecord(0, None, r, r["id"])) for r in records}
        for row in rows:
            conversation_id, k = row["question_id"].rsplit("-", 1)
            sample = by_id[conversation_id]
            messages = sample.messages[:2 * int(k) + 1]
            session = ChatSession()
            shown = sum(part.get("type") == "image" for m in messages for part in m["content"])
            images = sample.images[:shown]  # a later turn may bring more images
            session.sync(messages, [out / "images" / name for name in images], list(images))
            start = time.time()
            answer = engine.chat(session, config).strip().rstrip(".").lower()
            seconds.append(time.time() - start)
            right = answer == row["answer"].lower()
            if row["question_type"] == "describe":
                continue  # free text: not scored
            hits += right
            by_kind[row["question_type"]].append(right)
            if row["image_asked"] is not None:
                named += 1
                if not right and _right_elsewhere(row, answer, int(conversation_id.rsplit("-", 1)[1])):
                    other_image += 1
    scored = sum(len(v) for v in by_kind.values())
    print(json.dumps({
        "benchmark": "multi_image", "model": args.model, "quantize": args.quantize, "cpu": cpu_name(),
        "conversations": args.conversations, "questions": scored,
        "accuracy": round(100 * hits / max(scored, 1), 1),
        "by_kind": {kind: {"n": len(v), "accuracy": round(100 * sum(v) / len(v), 1)} for kind, v in
                    sorted(by_kind.items())},
        "about_another_image": round(100 * other_image / max(named, 1), 1),
        "median_answer_s": round(statistics.median(seconds), 3),
    }))
    return 0


def _right_elsewhere(row, answer: str, i: int) -> bool:
    """Whether a wrong answer about a named image is the right answer about another image of the conversation."""
    _, scenes = draw_scenes("test", 0, i)
    template = row["question"]
    for j, things in enumerate(scenes):
        if j == row["image_asked"]:
            continue
        for name in (label(row["image_asked"]), f"the {ORDINALS[row['image_asked']]} image", "this image"):
            if name in template:
                other = answer_in(template.replace(name, "{where}"), things)
                if other is not None and other.lower() == answer:
                    return True
    return False


if __name__ == "__main__":
    sys.exit(main())
