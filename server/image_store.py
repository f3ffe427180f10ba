"""Uploaded images kept by the server under their content hash.

The conversation lives in the browser (so it survives a reload) and names its images by key; the key maps only
to a file in this folder, so a value sent back by a browser can never point the server at another file. The same
image uploaded twice is stored once, and its key also lets the engine reuse its encoded features.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

from assistant.inputs.images import ImageError, load_image

_KEY = re.compile(r"^[0-9a-f]{40}\.(png|jpg|jpeg|gif|webp|bmp)$")


class ImageStore:
    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder or Path(tempfile.gettempdir()) / "vision-assistant-images")
        self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, upload: str, max_bytes: int) -> str:
        """Check an uploaded file and keep it; returns its key. Raises ImageError naming the file."""
        name = Path(upload).name
        size = Path(upload).stat().st_size if Path(upload).exists() else 0
        if size > max_bytes:
            raise ImageError(f"{name}: {size / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB upload limit")
        load_image(upload, max_bytes=max_bytes, where=name)  # raises a readable ImageError if unusable
        data = Path(upload).read_bytes()
        suffix = Path(upload).suffix.lower().lstrip(".")
        key = f"{hashlib.sha1(data).hexdigest()}.{suffix if suffix in ('png', 'jpg', 'jpeg', 'gif', 'webp', 'bmp') else 'png'}"
        target = self.folder / key
        if not target.exists():
            tmp = target.with_suffix(".part")
            shutil.copyfile(upload, tmp)
            tmp.replace(target)
        return key

    def browser_secret(self) -> str:
        """The key the browser's saved conversation is encrypted with: kept beside the images, so a conversation
        saved before a restart of the server still opens after it."""
        path = self.folder / ".browser-secret"
        if not path.is_file():
            tmp = path.with_suffix(f".{os.getpid()}")
            tmp.write_text(secrets.token_hex(16))
            tmp.chmod(0o600)
            tmp.replace(path)
        return path.read_text().strip()

    def is_key(self, key) -> bool:
        return isinstance(key, str) and bool(_KEY.match(key))

    def path(self, key: str) -> Path:
        if not self.is_key(key):
            raise ImageError(f"unknown image {key!r}")
        path = self.folder / key
        if not path.is_file():
            raise ImageError("an image of this conversation is no longer on the server (it restarted); "
                             "start a new chat or attach the image again")
        return path

    def path_if_present(self, key: str) -> Path | None:
        try:
            return self.path(key)
        except ImageError:
            return None
