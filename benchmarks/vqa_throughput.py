"""Batch VQA throughput: items/s at batch size 1 and 16 on the same easy-VQA test questions, in
one run, median of several repeats: batch 16 as `python -m assistant.vqa run` runs it by default (on the CPU one
packed sequence a batch, eager decode steps for the rows still answering) and with compiled steps for batches of
16 (`--compile always`: every row stepped until the last one ends). Prints one JSON line.

    python benchmarks/vqa_throughput.py [--model default] [--items 48] [--repeats 3]"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assistant.cpu.compiled_decoder import wait_for_compiled_steps  # noqa: E402
from assistant.inference.engine import Engine  # noqa: E402
from assistant.weights.loading import load_for_inference  # noqa: E402
from assistant.vqa.cli import LLAVA_SHORT_ANSWER  # noqa: E402
from assistant.vqa.inputs import builtin_dataset  # noqa: E402
from assistant.vqa.runner import run_questions  # noqa: E402


def items_per_second(engine, items, root, batch_size) -> float:
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        run_questions(engine, items, Path(d) / "out.jsonl", root, batch_size=batch_size, max_new_tokens=8,
                      prompt_suffix=LLAVA_SHORT_ANSWER, progress=False)
        return len(items) / (time.perf_counter() - t)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--items", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quantize", default="auto", help="LLM weights, as the VQA command takes them")
    args = p.parse_args(argv)
    import torch

    # as the VQA command runs them: batch 1 with compiled decode steps, batch 16 with eager ones (--compile auto);
    # and batch 16 with compiled steps for batches of 16 (--compile always), from a second copy of the model
    model, processor, runtime = load_for_inference(args.model, quantize=args.quantize, compile_decode=True)
    batch1_steps = wait_for_compiled_steps(runtime)
    model16, _, runtime16 = load_for_inference(args.model, quantize=args.quantize, compile_decode=True,
                                               decode_batch_size=16)
    batch16_steps = wait_for_compiled_steps(runtime16)
    engines = {"1": (Engine(model, processor, runtime), 1), "16": (Engine(model, processor, runtime), 16),
               "16_compiled": (Engine(model16, processor, runtime16), 16)}
    items, root = builtin_dataset("easy-vqa:test")
    items = items[:args.items]
    for engine, size in engines.values():  # warm-up
        items_per_second(engine, items[:16], root, size)
    runs = {name: [] for name in engines}
    for _ in range(args.repeats):  # interleaved, so that every variant sees the same machine load
        for name, (engine, size) in engines.items():
            runs[name].append(items_per_second(engine, items, root, size))
    rate = {name: statistics.median(values) for name, values in runs.items()}
    print(json.dumps({"benchmark": "vqa_throughput", "model": args.model, "items": len(items),
                      "weights": runtime.quantized or "fp32",
                      "batch1_decode_steps": batch1_steps, "batch16_compiled_decode_steps": batch16_steps,
                      "threads": torch.get_num_threads(), "batch1_items_per_s": round(rate["1"], 3),
                      "batch16_items_per_s": round(rate["16"], 3), "ratio_16_vs_1": round(rate["16"] / rate["1"], 2),
                      "batch16_compiled_items_per_s": round(rate["16_compiled"], 3),
                      "ratio_16_compiled_vs_1": round(rate["16_compiled"] / rate["1"], 2),
                      "runs": {k: [round(x, 3) for x in v] for k, v in runs.items()}}))


if __name__ == "__main__":
    main()
