"""Training state on disk, safetensors + JSON only: optimizer, scheduler, RNG, data position.

A checkpoint directory is written under a temporary name and renamed into place, so a run killed
at any moment leaves either the previous checkpoint or the new one, complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def optimizer_to_files(optimizer, directory: Path) -> None:
    sd = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, state in sd["state"].items():
        meta["state"][str(pid)] = {}
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                meta["state"][str(pid)][key] = value
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps(meta))


def optimizer_from_files(optimizer, directory: Path) -> None:
    meta = json.loads((directory / "optimizer.json").read_text())
    tensors = load_file(str(directory / "optimizer.safetensors"))
    state = {int(pid): dict(values) for pid, values in meta["state"].items()}
    for name, tensor in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_to_files(directory: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    save_file(tensors, str(directory / f"rng-{rank}.safetensors"))
    py = random.getstate()
    (directory / f"rng-{rank}.json").write_text(json.dumps({
        "python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]),
                                                          float(np_state[4])]}))


def rng_from_files(directory: Path, rank: int) -> None:
    tensors = load_file(str(directory / f"rng-{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    meta = json.loads((directory / f"rng-{rank}.json").read_text())
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def atomic_directory(parent: Path, name: str):
    """Context manager: yields a temp dir; on success it becomes parent/name (replacing any old one)."""

    class _Atomic:
        def __enter__(self):
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-"))
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            target = parent / name
            os.chmod(self.tmp, 0o755)
            if target.exists():
                old = parent / f".{name}.old-{os.getpid()}"
                os.replace(target, old)
                os.replace(self.tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, target)
            return False

    return _Atomic()


def latest_checkpoint(output_dir: Path) -> Path | None:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    root = output_dir / "checkpoints"
    steps = sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
