"""The chat as the UI keeps it (a list of turns with image file paths) and its two views:
the engine's messages and Gradio's chatbot messages."""

from __future__ import annotations

import hashlib
from pathlib import Path

from assistant.inputs.images import ImageError, load_image


def user_turn(text: str, image_paths: list[str]) -> dict:
    return {"role": "user", "text": text, "images": list(image_paths)}


def assistant_turn(text: str) -> dict:
    return {"role": "assistant", "text": text}


def check_upload(path: str, max_bytes: int) -> None:
    """Raise ImageError naming the file if an uploaded image cannot be used."""
    name = Path(path).name
    size = Path(path).stat().st_size if Path(path).exists() else 0
    if size > max_bytes:
        raise ImageError(f"{name}: {size / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB upload limit")
    load_image(path, max_bytes=max_bytes, where=name)


def image_key(path: str) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def to_engine(turns: list[dict]):
    """-> (messages, image paths, image keys) for ChatSession.sync."""
    messages, paths = [], []
    for t in turns:
        if t["role"] == "user":
            parts = [{"type": "image"} for _ in t["images"]]
            if t["text"]:
                parts.append({"type": "text", "text": t["text"]})
            paths += t["images"]
            messages.append({"role": "user", "content": parts})
        else:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": t["text"]}]})
    return messages, paths, [image_key(p) for p in paths]


def to_chatbot(turns: list[dict]) -> list[dict]:
    """Gradio chatbot messages: each image shown in the history, then the text."""
    out = []
    for t in turns:
        for p in t.get("images", []):
            out.append({"role": "user", "content": {"path": p}})
        if t["text"] or t["role"] == "assistant":
            out.append({"role": t["role"], "content": t["text"]})
    return out


def chatbot_index_to_turn(turns: list[dict], index: int) -> int:
    """Which turn a chatbot message index belongs to (images are separate chatbot messages)."""
    k = 0
    for i, t in enumerate(turns):
        k += len(t.get("images", [])) + (1 if (t["text"] or t["role"] == "assistant") else 0)
        if index < k:
            return i
    raise IndexError(index)
