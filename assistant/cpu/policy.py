"""Which device runs the model."""

import torch


def has_accelerator() -> bool:
    """A GPU (CUDA/ROCm), Apple MPS or Intel XPU is present. Without one, accelerate is told to use
    the CPU, which also makes a multi-process launch run CPU processes over gloo."""
    if torch.cuda.is_available():
        return True
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return True
    return hasattr(torch, "xpu") and torch.xpu.is_available()
