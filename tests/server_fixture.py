"""Start `python serve.py` in a subprocess on a free loopback port, for the server tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model: str, *extra: str, timeout: float = 300):
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "serve.py", "--model", model, "--port", str(port), *extra],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"serve.py exited: {log.read()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2)
                break
            except OSError as e:
                if "401" in str(e):
                    break
                if time.time() > deadline:
                    raise TimeoutError("serve.py did not come up") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
