"""Every entry point answers --help."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command,expected", [
    (["serve.py"], "--model"), (["-m", "assistant.vqa"], "run"), (["-m", "assistant.vqa", "run"], "--questions"),
    (["-m", "finetune"], "--config"), (["-m", "finetune.validate"], "--image-root"),
    (["-m", "finetune.merge"], "--llava"),
])
def test_help(command, expected):
    proc = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout
