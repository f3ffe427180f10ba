"""Fold a LoRA adapter into its base LLM: python -m finetune.merge ADAPTER_DIR --output-dir DIR [--llava]

The result is a standalone checkpoint (vision tower, projector and full LLM weights, safetensors);
with --llava, a transformers LlavaForConditionalGeneration directory (what vLLM / SGLang serve)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a trained model directory (with adapter/) or any model spec")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--llava", action="store_true", help="write the llava-hf format instead of ours")
    args = p.parse_args(argv)
    from assistant.weights.checkpoint import save_checkpoint
    from assistant.weights.llava import export_llava, merged_llm
    from assistant.weights.loading import ModelSpecError, load_model

    try:
        model, processor = load_model(args.model)
    except (ModelSpecError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.llava:
        try:
            export_llava(model, processor, args.output_dir)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        model.llm = merged_llm(model)
        save_checkpoint(model, processor, args.output_dir, save_llm=True)
    print(f"merged model written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
