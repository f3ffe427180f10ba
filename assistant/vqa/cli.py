"""python -m assistant.vqa run | score"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .metrics import score_items
from ..cpu.policy import QUANTIZE_CHOICES, QUANTIZE_HELP
from .inputs import InputError, builtin_dataset, load_annotations, load_questions, read_jsonl

LLAVA_SHORT_ANSWER = "Answer the question using a single word or phrase."
# --compile auto compiles decode steps at batch 1 only: packed batches step only the rows still answering, and
# compiled batch steps (every row, every step) pay off only where answers run long (docs/performance.md).
EXIT_SOME_FAILED = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m assistant.vqa",
                                description="Scripted visual question answering and VQA scoring.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer a questions file (or a built-in dataset); resumable",
                         description="Answers are appended to --output as they are produced; re-running with the "
                                     "same output skips answered ids. Bad items become {question_id, error} lines. "
                                     f"Exit status {EXIT_SOME_FAILED} when some items failed.")
    run.add_argument("--model", default="default", help="model spec: default, a directory, or a hub id")
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("--questions", help="JSONL {question_id, image, question[, answers|answer]} or VQAv2 questions JSON")
    src.add_argument("--dataset", help="built-in dataset: easy-vqa:test")
    run.add_argument("--output", required=True, help="answers JSONL (appended; resumable)")
    run.add_argument("--image-root", help="folder image paths are relative to (default: the questions file's folder)")
    run.add_argument("--annotations", help="answers to score against: VQAv2 annotations JSON or JSONL")
    run.add_argument("--metrics-out", help="write the metrics JSON here")
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--max-new-tokens", type=int, default=16)
    run.add_argument("--prompt-suffix", default=LLAVA_SHORT_ANSWER,
                     help=f"appended to each question on a new line (default: {LLAVA_SHORT_ANSWER!r}; '' for none)")
    run.add_argument("--limit", type=int, help="only the first N questions")
    run.add_argument("--explain", metavar="DIR",
                     help="also map where the model looked for each answer: a heatmap PNG per answer in DIR, the "
                          "numbers (map, image reliance) in the answers file")
    run.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="auto", help=QUANTIZE_HELP)
    run.add_argument("--compile", choices=("auto", "always", "never"), default="auto",
                     help="compiled decode steps (CPU, int8): auto: at batch size 1 only; always: for full batches "
                          "too (they step every row until the last answer ends: worth it where answers run long); "
                          "never: eager steps")
    run.add_argument("--verbose", action="store_true", help="also show the libraries' warnings and progress bars")
    score = sub.add_parser("score", help="score predictions (ours or anyone's) against annotations")
    score.add_argument("--predictions", required=True, help="JSONL {question_id, answer}")
    score.add_argument("--annotations", required=True, help="VQAv2 annotations JSON, or JSONL with answers")
    score.add_argument("--metrics-out", help="write the metrics JSON here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..console import setup_logging

    setup_logging(getattr(args, "verbose", False))
    try:
        return run_command(args) if args.command == "run" else score_command(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def compiles_decode_steps(mode: str, batch_size: int) -> bool:
    """--compile: whether to compile decode steps for this run's batch size (cpu/compiled_decoder.py; they serve one
    batch size)."""
    return mode == "always" or (mode == "auto" and batch_size == 1)


def run_command(args) -> int:
    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if args.dataset:
        items, image_root = builtin_dataset(args.dataset)
    else:
        items = load_questions(args.questions, args.annotations)
        image_root = args.image_root or str(Path(args.questions).resolve().parent)
    if args.limit:
        items = items[:args.limit]
    from ..inference.engine import Engine
    from ..weights.loading import ModelSpecError, load_for_inference
    from .runner import run_questions

    output = Path(args.output)
    if args.explain and Path(args.explain).exists() and not Path(args.explain).is_dir():
        raise InputError(f"--explain {args.explain}: a file, not a folder for the heatmaps")
    # before the model loads: an output that cannot be written would only fail after it
    if output.is_dir():
        raise InputError(f"--output {output}: a directory, not a file (answers are written as JSONL)")
    for folder in output.parents:
        if folder.exists() and not folder.is_dir():
            raise InputError(f"--output {output}: {folder} is a file, not a folder")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        open(output, "a", encoding="utf-8").close()
    except OSError as e:
        raise InputError(f"--output {output}: cannot be written ({e.strerror or e})") from None
    try:
        model, processor, runtime = load_for_inference(
            args.model, quantize=args.quantize, compile_decode=compiles_decode_steps(args.compile, args.batch_size),
            decode_batch_size=args.batch_size)
    except (ModelSpecError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: --model {args.model}: {e}", file=sys.stderr)
        return 2
    if not model.config.trained:
        print(f"warning: {model.config.description}", file=sys.stderr)
    problem = prompt_problem(processor, items, image_root, args.prompt_suffix)
    if problem:
        print(f"error: --model {args.model} cannot take this run's prompts: {problem}", file=sys.stderr)
        return 2
    counts = run_questions(Engine(model, processor, runtime), items, output, image_root, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, prompt_suffix=args.prompt_suffix,
                           explain_dir=Path(args.explain) if args.explain else None)
    rate = counts["answered"] / counts["seconds"] if counts["seconds"] > 0 else 0.0
    print(f"{counts['answered']} answered, {counts['failed']} failed, {counts['skipped']} already in {output} "
          f"({rate:.2f} items/s)")
    if any(it.get("answers") for it in items):
        metrics = _score(read_jsonl(output), {str(it["question_id"]): it for it in items if it.get("answers")})
        _report(metrics, args.metrics_out)
    return EXIT_SOME_FAILED if counts["failed"] else 0


def prompt_problem(processor, items, image_root, prompt_suffix: str) -> str | None:
    """Why the model cannot take the first well-formed item's prompt (its chat template, say), if it cannot: an
    error that would hit every item is said once, before the run."""
    from ..inputs.chat_format import ConversationError
    from .runner import prepare_item

    for item in items:
        try:
            messages, images = prepare_item(item, image_root, prompt_suffix)
        except (OSError, ValueError):
            continue  # a bad item: the run writes its error row
        try:
            processor.encode(messages, images)
        except ConversationError as e:
            return str(e)
        return None
    return None


def score_command(args) -> int:
    truth = load_annotations(args.annotations)
    metrics = _score(read_jsonl(args.predictions), truth)
    _report(metrics, args.metrics_out)
    return 0


def _score(predictions: list[dict], truth: dict) -> dict:
    items, missing, errors = [], 0, 0
    seen = set()
    for p in predictions:
        qid = str(p.get("question_id"))
        if qid not in truth or qid in seen:
            continue
        seen.add(qid)
        if "answer" not in p:
            errors += 1
            continue
        t = truth[qid]
        items.append({"prediction": str(p["answer"]), "answers": t["answers"],
                      "question_type": t.get("question_type"), "answer_type": t.get("answer_type")})
    missing = len(truth) - len(seen)
    metrics = score_items(items)
    metrics.update({"errors": errors, "missing": missing})
    return metrics


def _report(metrics: dict, metrics_out) -> None:
    if metrics.get("count"):
        print(f"VQA accuracy {metrics['vqa_accuracy']:.2f}  exact match {metrics['exact_match']:.2f}  "
              f"({metrics['count']} scored, {metrics['errors']} errors, {metrics['missing']} missing)")
        for key in ("by_question_type", "by_answer_type"):
            for name, m in metrics.get(key, {}).items():
                print(f"  {key[3:]:>13} {name:<20} {m['vqa_accuracy']:6.2f}  (n={m['count']})")
        if "yes_no" in metrics:
            yn = metrics["yes_no"]
            print(f"  yes/no: accuracy {100 * yn['accuracy']:.2f}  F1 {yn['f1']:.3f}  yes-ratio {yn['yes_ratio']:.3f}")
    else:
        print("nothing to score (no prediction matched an annotated question)")
    if metrics_out:
        Path(metrics_out).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_out).write_text(json.dumps(metrics, indent=2) + "\n")
