"""The default model's measured table (docs/model_card.md), as one JSON line.

    python benchmarks/default_model.py [--model default] [--out runs/bench] [--easy-vqa-limit N]

Greedy decoding, LLaVA's evaluation prompt ("Answer the question using a single word or phrase."),
through the same runner as `python -m assistant.vqa run`. Answer files are kept under --out, so an
interrupted benchmark resumes."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assistant.inference.engine import ChatSession, Engine  # noqa: E402
from assistant.inference.generation import GenerationConfig  # noqa: E402
from assistant.weights.loading import load_for_inference  # noqa: E402
from assistant.vqa.metrics import pope_scores, score_items  # noqa: E402
from assistant.vqa.cli import LLAVA_SHORT_ANSWER  # noqa: E402
from assistant.vqa.inputs import builtin_dataset, load_questions  # noqa: E402
from assistant.vqa.runner import run_questions  # noqa: E402

GENERAL_QUESTIONS = [
    "What is the capital of Italy?", "Give me two tips for staying focused while studying.",
    "What is the chemical symbol for water?", "Write one sentence about the ocean.",
    "How many legs does a spider have?", "What is the opposite of cold?", "Name a fruit that is yellow.",
    "Why do people exercise?", "What do bees make?", "Explain in one sentence what a library is.",
]


def scored(engine, items, out_file, image_root, limit=None):
    items = items[:limit] if limit else items
    counts = run_questions(engine, items, out_file, image_root, batch_size=16, max_new_tokens=8,
                           prompt_suffix=LLAVA_SHORT_ANSWER, progress=False)
    answers = {}
    for line in out_file.read_text().splitlines():
        r = json.loads(line)
        answers[str(r["question_id"])] = r.get("answer")
    rows = [{"prediction": answers[str(it["question_id"])], "answers": it["answers"] if it.get("answers") else
             [it["answer"]], "question_type": it.get("question_type")} for it in items
            if answers.get(str(it["question_id"])) is not None]
    return score_items(rows), rows, counts


def ensure_scenes(directory: Path) -> Path:
    if not (directory / "test_questions.jsonl").is_file():
        from finetune.scenes import write_split

        directory.mkdir(parents=True, exist_ok=True)
        for split in ("test", "compositions"):
            write_split(directory, split, 300, seed=0)
    return directory


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--scenes", default="data/scenes", help="folder with the held-out scene splits (made if missing)")
    p.add_argument("--easy-vqa-limit", type=int, help="first N easy-VQA test questions (default: all 9,673)")
    p.add_argument("--scenes-limit", type=int)
    p.add_argument("--quantize", default="none", help="LLM weights (the table is fp32: none; int8 for the fast path)")
    p.add_argument("--parts", default="easy_vqa,scenes,text", help="which parts of the table to measure")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model, processor, runtime = load_for_inference(args.model, quantize=args.quantize)
    engine = Engine(model, processor, runtime)
    weights = runtime.quantized or "fp32"
    out = out / weights if weights != "fp32" else out  # answer files of each precision apart
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "default_model", "model": args.model, "weights": weights}

    if "easy_vqa" in parts:
        items, root = builtin_dataset("easy-vqa:test")
        m, _, _ = scored(engine, items, out / "easyvqa_test.jsonl", root, args.easy_vqa_limit)
        result["easy_vqa_test"] = {"count": m["count"], "vqa_accuracy": m["vqa_accuracy"],
                                   "by_type": {k: v["vqa_accuracy"] for k, v in m.get("by_question_type", {}).items()}}
    if "scenes" in parts:
        scenes_part(engine, args, out, result)
    if "text" in parts:
        text_part(engine, result)
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result))


def scenes_part(engine, args, out, result) -> None:
    scenes = ensure_scenes(Path(args.scenes))
    test = load_questions(scenes / "test_questions.jsonl")
    m, rows, _ = scored(engine, test, out / "scenes_test.jsonl", scenes / "images", args.scenes_limit)
    result["scenes_test"] = {"count": m["count"], "vqa_accuracy": m["vqa_accuracy"],
                             "by_type": {k: v["vqa_accuracy"] for k, v in m.get("by_question_type", {}).items()}}
    exist = [r for r in rows if r["question_type"] == "exist"]
    pope = pope_scores([r["prediction"] for r in exist], [r["answers"][0] for r in exist])
    result["scenes_existence_pope"] = {k: pope[k] for k in ("count", "accuracy", "f1", "yes_ratio", "precision",
                                                            "recall")}
    comp = load_questions(scenes / "compositions_questions.jsonl")
    m, _, _ = scored(engine, comp, out / "scenes_compositions.jsonl", scenes / "images", args.scenes_limit)
    result["held_out_compositions"] = {"count": m["count"], "vqa_accuracy": m["vqa_accuracy"]}


def text_part(engine, result) -> None:
    chats = {}
    for q in ["What is the capital of France?"] + GENERAL_QUESTIONS:
        s = ChatSession()
        s.add_user_message(q)
        chats[q] = engine.chat(s, GenerationConfig(max_new_tokens=60))
    result["text_chat"] = {"paris": "Paris" in chats["What is the capital of France?"], "answers": chats}


if __name__ == "__main__":
    main()
