"""Instruction-tuning speed and loss in fp32 and in bf16 autocast, in the same run, as one JSON line.

    python benchmarks/training_speed.py [--model default] [--steps 24] [--batch-size 4]

The same short fixed run (LoRA r=16 on the LLM, projector and vision tower trained, as the default recipe does;
the same synthetic-scene conversations, seed and order) is trained twice through `python -m finetune`, once with
`train.mixed_precision=no` and once with `bf16`; tokens/s is the median of the logged windows after the first (the
first holds start-up work), the loss the mean of the last two logged windows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(precision: str, model: str, data: Path, out: Path, steps: int, batch_size: int) -> dict:
    args = [sys.executable, "-m", "finetune", "--config", str(ROOT / "configs/train/smoke.yaml"),
            "--data", str(data / "train.jsonl"), "--image-root", str(data / "images"),
            "--output-dir", str(out), f"init={model}", "stage=instruct", "vision=full", "projector=full", "llm=lora",
            f"train.max_steps={steps}", f"train.batch_size={batch_size}", "train.log_every=4",
            f"train.save_every={steps}", f"train.eval_every={steps * 10}", "train.seed=0", "train.lr=2e-4",
            f"train.mixed_precision={precision}", "data.max_length=512", "data.eval_fraction=0", "lora.r=16",
            "lora.alpha=32"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"training with {precision} failed:\n{proc.stderr[-3000:]}")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    windows = [e for e in log if "tokens_per_s" in e]
    return {"tokens_per_s": round(statistics.median(e["tokens_per_s"] for e in windows[1:]), 1),
            "final_loss": round(statistics.mean(e["loss"] for e in windows[-2:]), 4),
            "losses": [round(e["loss"], 4) for e in windows]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)
    import torch

    from assistant.cpu.policy import bf16_matmul_is_fast, training_precision
    from finetune.scenes import write_split

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "scenes"
        data.mkdir()
        write_split(data, "train", args.steps * args.batch_size, seed=0)
        fp32 = run("no", args.model, data, Path(tmp) / "fp32", args.steps, args.batch_size)
        bf16 = run("bf16", args.model, data, Path(tmp) / "bf16", args.steps, args.batch_size)
    print(json.dumps({
        "benchmark": "training_speed", "model": args.model, "steps": args.steps, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_matmul_is_fast": bf16_matmul_is_fast(), "auto_picks": training_precision("auto"),
        "fp32": fp32, "bf16": bf16, "bf16_speedup": round(bf16["tokens_per_s"] / fp32["tokens_per_s"], 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
