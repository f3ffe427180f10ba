"""`torch.ops.assistant.decode_attention`: one new token's attention over the filled part of a static KV
cache, for the compiled decode steps (compiled_decoder.py, through attention.py). The kernel is decode_attention.cpp; this file
builds it on first use (about 10 s, with the C++ compiler torch.compile needs anyway; torch's extension
builder caches the library and rebuilds when the source or the flags change) and registers its shape
function so that torch.compile can put it in a graph.

Why a kernel of our own: for one query token PyTorch's CPU SDPA spends most of its time on set-up, not
arithmetic (bf16 GEMM packing for 3 x L matrices, heads split unevenly over the threads), a large share of a
small model's decode step (docs/performance.md). Where it cannot be built (no
compiler, no ninja) or does not take the shapes (head dims other than 16 / 32 / 64 / 128, more than 8
query heads per key/value head), the decode steps use SDPA as before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_attention.cpp")
HEAD_DIMS = (16, 32, 64, 128)
MAX_GROUPS = 8
STALE_LOCK_SECONDS = 300  # a build takes 10-20 s

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
error: str | None = None


def _isa_flags() -> tuple[str, list[str]]:
    """The vector instructions PyTorch itself uses on this CPU, as compiler flags (not -march=native: a
    cache directory shared by different machines would otherwise hand one of them instructions it lacks)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return "avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"]
    if capability == "AVX2":
        return "avx2", ["-mavx2", "-mfma"]
    return "generic", []


def load() -> bool:
    """Build (first time) and load the kernel; False, with `error` set and a warning, where it cannot be."""
    global _loaded, error
    with _lock:
        if _loaded is None:
            try:
                from torch.utils import cpp_extension

                _put_ninja_on_path()
                isa, flags = _isa_flags()
                name = f"assistant_decode_attention_{isa}"
                directory = build_directory(name)
                wait_for_other_build(directory / "lock")
                # -ffast-math: exp vectorised (glibc's libmvec); the kernel uses no infinities or NaNs
                # -fopenmp: at::parallel_for runs on PyTorch's OpenMP threads (already loaded, so shared)
                cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(directory),
                                   extra_cflags=["-O3", "-ffast-math", "-fopenmp", *flags], extra_ldflags=["-fopenmp"],
                                   is_python_module=False, verbose=False)
                torch.library.register_fake("assistant::decode_attention")(_shape)
                _loaded = True
            except Exception as e:  # no compiler, no ninja, an unsupported platform...: SDPA stays
                _loaded = False
                error = f"{type(e).__name__}: {e}".strip()[:500]
                warnings.warn(f"decode attention kernel not built, decode steps use SDPA ({error})", RuntimeWarning)
        return _loaded


def _put_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the pip package's copy is not there when the environment's
    python is run by its full path without activating it."""
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_directory(name: str) -> Path:
    """Where the kernel is built and cached: torch's extension directory (or $TORCH_EXTENSIONS_DIR), one
    folder per torch version (torch's builder rebuilds when the source or flags change, not when torch
    does). A lock file older than STALE_LOCK_SECONDS is removed: it was left by a process killed while
    building (Ctrl-C in the first seconds of serve.py), and torch's builder would wait for it forever."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    directory = root / f"{name}-torch-{torch.__version__}"
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"
    with contextlib.suppress(FileNotFoundError):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()
    return directory


def wait_for_other_build(lock: Path) -> None:
    """Wait while another process builds (its `lock`), removing the lock once it is older than STALE_LOCK_SECONDS:
    a lock that went stale while we waited (its builder was killed) would otherwise keep torch's builder waiting
    forever, as one found stale on arrival would (build_directory)."""
    while True:
        try:
            if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
                lock.unlink(missing_ok=True)
                return
        except FileNotFoundError:
            return
        time.sleep(1)


def _shape(query, key, value, valid_length, scale):
    return query.new_empty(query.shape)


def supports(module, dtype=torch.bfloat16) -> bool:
    """Whether the kernel is loaded and takes this attention module's shapes and this dtype (bf16 only)."""
    groups = getattr(module, "num_key_value_groups", 1)
    return (bool(_loaded) and dtype == torch.bfloat16 and getattr(module, "head_dim", None) in HEAD_DIMS
            and 1 <= groups <= MAX_GROUPS)


def decode_attention(query, key, value, valid_length: int, scale: float):
    """query (batch, heads, 1, dim), key / value caches (batch, kv_heads, max_length, dim) with contiguous
    rows; attends to the first `valid_length` positions. Returns (batch, heads, 1, dim)."""
    return torch.ops.assistant.decode_attention(query, key, value, valid_length, scale)
