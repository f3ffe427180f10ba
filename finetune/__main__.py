"""python -m finetune --config configs/train/<recipe>.yaml [--data FILE] [--image-root DIR]
[--output-dir DIR] [--max-steps N] [--resume] [--verbose] [key=value ...]"""

from __future__ import annotations

import argparse
import sys

from .config import load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finetune",
        description="Train a stage of the vision-language model (clip, align or instruct) from a YAML recipe.",
        epilog="Overrides: key=value pairs after the flags, e.g. train.lr=1e-4 lora.r=8 data.max_length=512. "
               "Multi-GPU: accelerate launch --config_file configs/accelerate/ddp.yaml -m finetune --config ...",
    )
    parser.add_argument("--config", required=True, help="YAML recipe (configs/train/*.yaml)")
    parser.add_argument("--data", help="training data (LLaVA JSON/JSONL or messages format); overrides data.train")
    parser.add_argument("--image-root", help="folder the data's image paths are relative to")
    parser.add_argument("--output-dir", help="where checkpoints, logs and the final model go")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (overrides train.max_steps)")
    parser.add_argument("--resume", action="store_true",
                        help="resume from the latest checkpoint in the output dir (one found there always resumes)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show the libraries' own warnings and progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    from assistant.console import setup_logging

    setup_logging(args.verbose)
    overrides = list(args.overrides)
    for flag, key in (("data", "data.train"), ("image_root", "data.image_root"),
                      ("output_dir", "train.output_dir"), ("max_steps", "train.max_steps")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        cfg = load_config(args.config, overrides).validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from assistant.weights.loading import ModelSpecError

    from .data import DataError

    try:
        if cfg.stage == "clip":
            from .clip_stage import train_clip

            train_clip(cfg, resume=args.resume)
        else:
            from .trainer import train

            train(cfg, resume=args.resume)
    except (DataError, ModelSpecError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
