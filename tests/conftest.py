import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: a test that reaches for it must fail fast
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from helpers import make_tiny_llm_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    return make_tiny_llm_dir(tmp_path_factory.mktemp("tiny-llm"))


@pytest.fixture(scope="session")
def tiny_llm_dir_gentle(tmp_path_factory):
    """Weights at the usual scale (std 0.02), where quantisation error is what it is in real models."""
    return make_tiny_llm_dir(tmp_path_factory.mktemp("tiny-llm-gentle"), initializer_range=0.02)
