"""Check training data without training: python -m finetune.validate FILE --image-root DIR

Reports every problem with its file, line, sample index and id: JSON syntax, unknown fields, role
order, empty turns, <image> placeholders vs images, missing / unreadable / escaping images, and
samples longer than the context (with their token counts, when --model is given)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from assistant.inputs.images import ImageError, load_image

from .data import DataError, load_samples, resolve_image


@dataclass
class Report:
    samples: int
    valid: int
    problems: list[DataError]

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for p in self.problems:
            key = p.message.split(" (")[0].split(":")[0]
            kinds[key] = kinds.get(key, 0) + 1
        lines = [f"{self.valid} of {self.samples} samples valid; {len(self.problems)} problem(s)"]
        lines += [f"  {n:5d} x {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)


def validate(path, image_root=None, processor=None, max_length: int | None = None, check_images: bool = True) -> Report:
    samples, problems = load_samples(path)
    total = len(samples) + len({p.where for p in problems})
    valid = 0
    for sample in samples:
        bad = []
        if check_images:
            for rel in sample.images:
                try:
                    load_image(resolve_image(image_root, rel, sample.where))
                except (ImageError, DataError) as e:
                    bad.append(DataError(sample.where, f"image {rel!r}: {getattr(e, 'message', str(e))}"))
        if processor is not None and max_length:
            n = len(processor.chat.encode(sample.messages, add_generation_prompt=False).input_ids)
            if n > max_length:
                bad.append(DataError(sample.where, f"too long: {n} tokens > max_length {max_length} "
                                                    "(trailing turns will be dropped in training)"))
        problems += bad
        valid += not bad
    return Report(total, valid, problems)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="LLaVA / messages JSON or JSONL")
    p.add_argument("--image-root", help="folder the image paths are relative to")
    p.add_argument("--model", help="model spec whose tokenizer counts tokens (e.g. default)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--json", help="also write the problems as JSON here")
    args = p.parse_args(argv)
    processor = None
    if args.model:
        from assistant.weights.loading import load_model

        _, processor = load_model(args.model)
    try:
        report = validate(args.file, args.image_root, processor, args.max_length)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for problem in report.problems[:200]:
        print(problem)
    if len(report.problems) > 200:
        print(f"... and {len(report.problems) - 200} more")
    print(report.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"where": e.where, "problem": e.message} for e in report.problems], f, indent=1)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
