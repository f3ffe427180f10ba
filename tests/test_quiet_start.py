"""`python serve.py` shows what a user needs (where to open it, that it gets faster, when it has) and no
third-party warnings, progress bars or autotuning tables: here on a checkpoint that takes the fast path, with an
empty compile cache so that the compile (and its autotuning) really runs."""

import os
import subprocess
import sys
import time
import urllib.request

from hf_checkpoints import llava_clip_llama
from server_fixture import ROOT, free_port

NOISE = ("Warning", "warn(", "AUTOTUNE", "Autotune", "Failed to load", "Loading weights", "Traceback", "it/s]")


def test_serve_starts_quietly_and_says_when_it_is_faster(tmp_path):
    directory = llava_clip_llama(tmp_path / "llava")
    port = free_port()
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "serve.py", "--model", str(directory), "--port", str(port)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 600
        while "faster replies ready" not in log_path.read_text() and "replies stay" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    assert any(line.startswith("chat UI: http://127.0.0.1:") for line in lines)
    assert any("faster replies ready" in line for line in lines)
    assert not [line for line in lines if any(word in line for word in NOISE)], lines
    assert len(lines) <= 4, lines
