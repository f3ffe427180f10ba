"""A worked example of teaching the default model a new domain, with and without replay.

The new domain is handwritten digits (scikit-learn's 8x8 digits, 1,797 images, upscaled to 64x64): the default
model has only ever seen drawn shapes. This script writes the data in the project's format, then for each arm
runs the custom recipe as a user would (`python -m finetune --config configs/train/custom.yaml ...`), and scores
held-out digit questions with `python -m assistant.vqa run` before and after. The starting model's own skills
before and after come from each run's skills.json.

    pip install scikit-learn
    python benchmarks/replay_example.py --out runs/digits --minutes 30 [--arms replay,none] [--threads 1]

Both arms run at once (one torch thread each) so they share the machine alike; results go to
benchmarks/results_replay_example.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py: this folder is on the path when run as a script

ROOT = Path(__file__).resolve().parent.parent
SHORT = "Answer the question using a single word or phrase."
QUESTIONS = ["What digit is this?", "Which digit is written here?", "What number is shown in the image?"]


def write_digits(out: Path, n_test: int = 297) -> tuple[Path, Path, Path]:
    """train.jsonl (conversations), test.jsonl (conversations, for evaluation in training) and
    test_questions.jsonl (for assistant.vqa), with PNGs under out/images."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.images))
    test_ids = set(order[:n_test].tolist())
    train_lines, test_lines, question_lines = [], [], []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        name = f"{i:04d}.png"
        grey = (255 - pixels / 16.0 * 255).astype("uint8")  # dark ink on white paper
        Image.fromarray(grey).resize((64, 64), Image.BICUBIC).convert("RGB").save(images / name)
        question = QUESTIONS[i % len(QUESTIONS)]
        record = {"id": f"digit-{i}", "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{question}\n{SHORT}"}, {"from": "gpt", "value": str(label)}]}
        if i in test_ids:
            test_lines.append(json.dumps(record))
            question_lines.append(json.dumps({"question_id": f"digit-{i}", "image": name, "question": question,
                                              "answer": str(label)}))
        else:
            train_lines.append(json.dumps(record))
    paths = out / "train.jsonl", out / "test.jsonl", out / "test_questions.jsonl"
    for path, lines in zip(paths, (train_lines, test_lines, question_lines)):
        path.write_text("\n".join(lines) + "\n")
    return paths


def vqa_accuracy(model: str, questions: Path, images: Path, out: Path, threads: int) -> float:
    metrics = out.with_suffix(".metrics.json")
    out.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "assistant.vqa", "run", "--model", model, "--questions", str(questions),
                    "--image-root", str(images), "--output", str(out), "--metrics-out", str(metrics),
                    "--batch-size", "16"], check=True, cwd=ROOT, env=_env(threads))
    return json.loads(metrics.read_text())["vqa_accuracy"]


def _replay_share(run_dir: Path) -> str:
    """What the run's log says it mixed in (the share is of the training tokens)."""
    for line in (run_dir.parent / f"{run_dir.name}.log").read_text().splitlines():
        if line.startswith("replay: "):
            return line[len("replay: "):]
    return "none"


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/digits")
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--arms", default="replay,none", help="replay: data.replay=default; none: no replay")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (both arms run at once)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results_replay_example.json"))
    args = p.parse_args()
    out = Path(args.out).resolve()
    data = out / "data"
    train, test, questions = write_digits(data)
    results_file = Path(args.results)
    earlier = json.loads(results_file.read_text()) if results_file.is_file() else {}
    # arms not run this time keep their earlier figures
    results = {"dataset": "scikit-learn digits, 8x8 upscaled to 64x64", "train_samples": sum(1 for _ in open(train)),
               "test_questions": sum(1 for _ in open(questions)), "minutes": args.minutes, "threads": args.threads,
               "cpu": cpu_name(), "arms": earlier.get("arms", {})}
    results["accuracy_before"] = vqa_accuracy("default", questions, data / "images", out / "answers_before.jsonl",
                                              args.threads)
    runs = {}
    for arm in args.arms.split(","):
        run_dir = out / f"run-{arm}"
        command = [sys.executable, "-m", "finetune", "--config", "configs/train/custom.yaml", "--data", str(train),
                   "--image-root", str(data / "images"), "--output-dir", str(run_dir), f"data.eval={test}",
                   f"data.replay={'default' if arm == 'replay' else 'none'}", f"train.max_minutes={args.minutes}",
                   f"train.num_threads={args.threads}"]
        log = open(out / f"run-{arm}.log", "w")
        runs[arm] = (run_dir, subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                                env=_env(args.threads)))
    for arm, (run_dir, process) in runs.items():
        if process.wait() != 0:
            raise SystemExit(f"the {arm} run failed: see {out / f'run-{arm}.log'}")
    for arm, (run_dir, _) in runs.items():
        skills = json.loads((run_dir / "skills.json").read_text())
        rows = [json.loads(line) for line in open(run_dir / "train_log.jsonl")]
        steps = max(r["step"] for r in rows)
        results["arms"][arm] = {
            "steps": steps,
            "accuracy_after": vqa_accuracy(str(run_dir), questions, data / "images", out / f"answers_{arm}.jsonl",
                                           args.threads),
            "skills_before": {k: v.get("accuracy") for k, v in skills["before"].items()},
            "skills_after": {k: v.get("accuracy") for k, v in skills["after"].items()},
            "text_answer_words": [skills["before"]["text questions"]["mean_words"],
                                  skills["after"]["text questions"]["mean_words"]],
            "run": {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "threads": args.threads,
                    "arms_at_once": args.arms, "replay_share": _replay_share(run_dir)},
        }
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))



if __name__ == "__main__":
    main()
