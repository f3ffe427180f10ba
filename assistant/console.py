"""What the command-line entry points show: their own lines, and third-party chatter only with --verbose.

Called first thing by serve.py and the VQA command, before torch, transformers, peft or bitsandbytes
are imported (bitsandbytes warns about optional CPU kernels while it is imported)."""

from __future__ import annotations

import logging
import os
import warnings

# loggers of libraries whose warnings mean nothing to a user of this project (optional kernels, deprecations)
THIRD_PARTY = ("bitsandbytes", "kernels", "huggingface_hub", "transformers", "peft", "accelerate", "torch", "httpx",
               "gradio")


def setup_logging(verbose: bool = False) -> None:
    """This project's messages at INFO on stderr; libraries' warnings, progress bars and deprecation notices only
    when `verbose`."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("assistant").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("server").setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        return
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        for module in ("transformers", "torch", "peft", "accelerate", "bitsandbytes", "gradio"):
            warnings.filterwarnings("ignore", category=category, module=module)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
