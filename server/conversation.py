"""The chat as the UI keeps it and its two views: the engine's messages and Gradio's chatbot messages.

A conversation is a list of turns, `{"role": "user", "text", "images": [image keys]}` and `{"role":
"assistant", "text"}`. Images are named by the key of their copy in the image store (image_store.py), never by a
path, because the conversation is kept in the browser and comes back from it on a reload.

Images are numbered through the conversation ("Image 1", "Image 2") in the chat, and, once a conversation holds
more than one, in the prompt too, so that "the second image" means the same to the person and the model.
"""

from __future__ import annotations

import gradio as gr

from .image_store import ImageStore

TURN_ROLES = ("user", "assistant")


def user_turn(text: str, image_keys: list[str]) -> dict:
    return {"role": "user", "text": text, "images": list(image_keys)}


def assistant_turn(text: str) -> dict:
    return {"role": "assistant", "text": text}


def image_label(number: int) -> str:
    return f"Image {number}"


def to_engine(turns: list[dict], store: ImageStore):
    """-> (messages, image paths, image keys) for ChatSession.sync. With several images in the conversation,
    each is introduced by its label ("Image 2:") so a question can name it."""
    messages, paths, keys = [], [], []
    numbered = sum(len(t.get("images", [])) for t in turns) > 1
    for t in turns:
        if t["role"] == "user":
            parts = []
            for key in t["images"]:
                keys.append(key)
                paths.append(store.path(key))
                if numbered:
                    parts.append({"type": "text", "text": f"{image_label(len(keys))}:"})
                parts.append({"type": "image"})
            if t["text"]:
                parts.append({"type": "text", "text": t["text"]})
            messages.append({"role": "user", "content": parts})
        else:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": t["text"]}]})
    return messages, paths, keys


def to_chatbot(turns: list[dict], store: ImageStore) -> list[dict]:
    """Gradio chatbot messages: a question's images, each shown with its number, then its text; an image no longer
    on the server (it restarted since) shows as a note. Each is a message of its own (the chatbot does not group
    them): Gradio's editor cannot send an edit of a group that holds an image."""
    out = []
    number = 0
    for t in turns:
        for key in t.get("images", []):
            number += 1
            path = store.path_if_present(key)
            if path is None:
                out.append({"role": "user", "content": f"[{image_label(number)}: no longer on the server]"})
            else:
                out.append({"role": "user", "content": gr.Image(str(path), label=image_label(number), show_label=True,
                                                              buttons=["fullscreen"])})
        if t["text"] or t["role"] == "assistant":
            out.append({"role": t["role"], "content": t["text"]})
    return out


def chatbot_index_to_turn(turns: list[dict], index: int) -> tuple[int, bool]:
    """Which turn a chatbot message index belongs to, and whether that message is the turn's text (each image is
    a chatbot message of its own, before the text)."""
    k = 0
    for i, t in enumerate(turns):
        images = len(t.get("images", []))
        has_text = bool(t["text"] or t["role"] == "assistant")
        if index < k + images + has_text:
            return i, has_text and index == k + images
        k += images + has_text
    raise IndexError(index)


def valid_turns(value, store: ImageStore) -> list[dict]:
    """A conversation that came back from the browser, reduced to well-formed turns whose images this server
    holds or held (anything else is dropped: the browser's copy is not trusted)."""
    if not isinstance(value, list):
        return []
    turns = []
    for t in value:
        if not isinstance(t, dict) or t.get("role") not in TURN_ROLES or not isinstance(t.get("text"), str):
            continue
        if t["role"] == "user":
            images = t.get("images")
            keys = [k for k in images if store.is_key(k)] if isinstance(images, list) else []
            turns.append(user_turn(t["text"], keys))
        else:
            turns.append(assistant_turn(t["text"]))
    return turns
