"""Average models trained from the same start (a model soup):
python -m finetune.soup MODEL MODEL [...] --weights W W [...] --output-dir DIR

A model and a fine-tuned pass of it, averaged, often keep the new skill and most of what the pass made the model
forget (WiSE-FT). The LoRA updates are averaged as weight updates and refactored to one rank by SVD (peft's
add_weighted_adapter); vision towers and projectors are averaged parameter by parameter."""

from __future__ import annotations

import argparse
import sys

import torch


class SoupError(ValueError):
    """Models that cannot be averaged; the message says which and why."""


def soup(models: list, weights: list[float], rank: int | None = None):
    """Average loaded models (the first one is changed and returned): their LLMs' LoRA adapters by peft's
    "svd" combination at `rank` (default: the largest rank among them), everything else parameter-wise."""
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    check_counts(len(models), len(weights))
    first = models[0]
    for i, model in enumerate(models[1:], 1):
        if model.config.llm != first.config.llm:
            raise SoupError(f"model {i + 1} adapts LLM {model.config.llm!r}, model 1 {first.config.llm!r}: only "
                            "models fine-tuned from the same LLM can be averaged")
    if not all(isinstance(model.llm, PeftModel) for model in models):
        raise SoupError("every model needs a LoRA adapter (a model with its full LLM trained is not supported)")
    for part in ("vision_tower", "projector"):
        _average_module([getattr(m, part) for m in models], weights, part)

    llm = first.llm
    own = llm.active_adapter  # its weights are copied below like every other model's
    names = []
    for i, model in enumerate(models):
        name = f"soup_input_{i}"
        source = model.llm.active_adapter
        llm.add_adapter(name, model.llm.peft_config[source])
        set_peft_model_state_dict(llm, get_peft_model_state_dict(model.llm, adapter_name=source), adapter_name=name)
        names.append(name)
    llm.delete_adapter(own)
    rank = rank or max(llm.peft_config[name].r for name in names)
    with torch.no_grad():
        llm.add_weighted_adapter(names, list(weights), adapter_name="default", combination_type="svd", svd_rank=rank)
    llm.set_adapter("default")
    for name in names:
        llm.delete_adapter(name)
    return first


def check_counts(n_models: int, n_weights: int) -> None:
    if n_models != n_weights or n_models < 2:
        raise SoupError(f"give two or more models and one weight each (got {n_models} models, {n_weights} weights)")


def _average_module(modules: list, weights: list[float], what: str) -> None:
    states = [m.state_dict() for m in modules]
    for i, state in enumerate(states[1:], 1):
        if state.keys() != states[0].keys() or any(state[k].shape != states[0][k].shape for k in state):
            raise SoupError(f"model {i + 1}'s {what} has other parameters than model 1's: not the same architecture")
    averaged = {}
    for key, first in states[0].items():
        if not first.is_floating_point() or all(torch.equal(first, s[key]) for s in states[1:]):
            averaged[key] = first  # a part no model changed (frozen in the pass) stays bit for bit
        else:
            averaged[key] = sum(w * s[key].float() for w, s in zip(weights, states)).to(first.dtype)
    modules[0].load_state_dict(averaged)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.soup", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model specs (trained directories or default), all from one start")
    p.add_argument("--weights", nargs="+", type=float, required=True, help="one per model, usually summing to 1")
    p.add_argument("--rank", type=int, help="LoRA rank of the result (default: the largest of the inputs')")
    p.add_argument("--output-dir", required=True)
    args = p.parse_args(argv)
    from assistant.console import setup_logging

    setup_logging()
    from assistant.weights.checkpoint import save_checkpoint
    from assistant.weights.loading import ModelSpecError, load_model

    try:
        check_counts(len(args.models), len(args.weights))  # before any model is loaded
        loaded = [load_model(spec) for spec in args.models]
        model = soup([m for m, _ in loaded], args.weights, args.rank)
    except (ModelSpecError, SoupError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_checkpoint(model, loaded[0][1], args.output_dir)
    print(f"averaged model written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
