"""training_curves.png: loss and evaluation accuracy against step, from the JSONL log."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(log_file: Path, out_png: Path) -> None:
    if not Path(log_file).is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = [], []
    for line in Path(log_file).read_text().splitlines():
        entry = json.loads(line)
        if "loss" in entry:
            train.append((entry["step"], entry["loss"]))
        if "eval_loss" in entry:
            evals.append(entry)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax[0].plot(*zip(*train), label="train loss")
    if evals:
        ax[0].plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss")
        acc = [(e["step"], e["eval_vqa_accuracy"]) for e in evals if "eval_vqa_accuracy" in e]
        if acc:
            ax[1].plot(*zip(*acc), "o-", color="tab:green")
    ax[0].set_xlabel("step"), ax[0].set_ylabel("loss"), ax[0].legend()
    ax[1].set_xlabel("step"), ax[1].set_ylabel("eval VQA accuracy (%)"), ax[1].set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
