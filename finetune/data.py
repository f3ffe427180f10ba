"""Instruction data: LLaVA JSON / JSONL and the `messages` + `images` form, read into one shape.

    LLaVA:    {"id", "image": str | [str], "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}]}
    messages: {"id", "images": [str], "messages": [{"role": "user"|"assistant"|"system", "content": str | [parts]}]}

`<image>` in a data file marks where an image goes (in the messages form, so do {"type": "image"}
parts). Image paths resolve under the image root and never outside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from assistant.inputs.paths import PathEscapeError, resolve_under_root

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "system": "system", "bot": "assistant", "model": "assistant"}
DATA_IMAGE_TOKEN = "<image>"


class DataError(ValueError):
    """A problem in the data, located: `where` names the file, line and sample."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


@dataclass
class Sample:
    id: str
    messages: list[dict]  # our format: content is a list of parts
    images: list[str]  # as written in the data (resolved later, under the image root)
    where: str  # "file:line (id X)" for messages


@dataclass
class RawRecord:
    index: int
    line: int | None
    data: object
    where: str


def read_records(path) -> tuple[list[RawRecord], list[DataError]]:
    """Read a .json (array) or .jsonl file; syntax errors are reported with their line, not raised."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "data file not found")
    text = path.read_text(encoding="utf-8")
    records, errors = [], []
    stripped = text.lstrip()
    if path.suffix == ".json" or stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            return [], [DataError(f"{path}:{e.lineno}", f"invalid JSON ({e.msg}, column {e.colno})")]
        if not isinstance(data, list):
            return [], [DataError(str(path), "a .json data file must hold a list of samples")]
        for i, item in enumerate(data):
            records.append(RawRecord(i, None, item, f"{path} sample {i}"))
        return records, errors
    index = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(DataError(f"{path}:{lineno}", f"invalid JSON ({e.msg}, column {e.colno})"))
            index += 1
            continue
        records.append(RawRecord(index, lineno, item, f"{path}:{lineno}"))
        index += 1
    return records, errors


def parse_record(record: RawRecord) -> Sample:
    """One raw record -> Sample, or a DataError saying what is wrong with it."""
    item = record.data
    if not isinstance(item, dict):
        raise DataError(record.where, "a sample must be a JSON object")
    sample_id = str(item.get("id", record.index))
    where = f"{record.where} (id {sample_id})"
    if "conversations" in item:
        images = item.get("image", item.get("images", []))
        turns = item["conversations"]
        if not isinstance(turns, list):
            raise DataError(where, "'conversations' must be a list")
        messages = []
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataError(where, f"turn {j}: expected {{'from': ..., 'value': ...}}")
            role = ROLE_NAMES.get(str(turn["from"]).lower())
            if role is None:
                raise DataError(where, f"turn {j}: unknown speaker {turn['from']!r} (use human / gpt / system)")
            messages.append({"role": role, "content": _split_images(str(turn["value"]))})
    elif "messages" in item:
        images = item.get("images", item.get("image", []))
        turns = item["messages"]
        if not isinstance(turns, list):
            raise DataError(where, "'messages' must be a list")
        messages = []
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict) or "role" not in turn:
                raise DataError(where, f"message {j}: expected {{'role': ..., 'content': ...}}")
            role = ROLE_NAMES.get(str(turn["role"]).lower())
            if role is None:
                raise DataError(where, f"message {j}: unknown role {turn['role']!r}")
            content = turn.get("content", "")
            if isinstance(content, str):
                parts = _split_images(content)
            elif isinstance(content, list):
                parts = []
                for p in content:
                    kind = p.get("type") if isinstance(p, dict) else None
                    if kind in ("image", "image_url"):
                        parts.append({"type": "image"})
                    elif kind == "text":
                        parts.extend(_split_images(str(p.get("text", ""))))
                    else:
                        raise DataError(where, f"message {j}: parts must have type 'text' or 'image'")
            else:
                raise DataError(where, f"message {j}: content must be a string or a list of parts")
            messages.append({"role": role, "content": parts})
    else:
        raise DataError(where, "expected 'conversations' (LLaVA) or 'messages'")
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise DataError(where, "'image' / 'images' must be a path or a list of paths")
    return Sample(sample_id, messages, images, where)


def _split_images(text: str) -> list[dict]:
    """'<image>\\nWhat is it?' -> [image part, text part]; text around each <image> is kept."""
    parts = []
    chunks = text.split(DATA_IMAGE_TOKEN)
    for k, chunk in enumerate(chunks):
        if k > 0:
            parts.append({"type": "image"})
        if len(chunks) > 1:
            chunk = chunk.strip("\n")  # the newline LLaVA puts after <image> belongs to the placeholder
        if chunk.strip():
            parts.append({"type": "text", "text": chunk})
    return parts


def resolve_image(image_root, relative: str, where: str) -> Path:
    """A data path under the image root; absolute paths, '..' and symlinks out of the root are refused."""
    try:
        return resolve_under_root(image_root, relative)
    except PathEscapeError as e:
        raise DataError(where, str(e)) from None


def structural_problems(sample: Sample) -> list[str]:
    """Role order, empty turns, placeholder count vs images."""
    problems = []
    roles = [m["role"] for m in sample.messages]
    if not roles:
        return ["no turns"]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        problems.append("a system message may only come first")
    if not body or body[0] != "user":
        problems.append("the conversation must start with a user turn")
    for a, b in zip(body, body[1:]):
        if a == b:
            problems.append(f"two {a} turns in a row (roles must alternate user / assistant)")
            break
    if body and body[-1] != "assistant":
        problems.append("the conversation must end with an assistant reply")
    for j, m in enumerate(sample.messages):
        has_text = any(p["type"] == "text" and p["text"].strip() for p in m["content"])
        has_image = any(p["type"] == "image" for p in m["content"])
        if not has_text and not has_image:
            problems.append(f"turn {j} ({m['role']}) is empty")
        if has_image and m["role"] != "user":
            problems.append(f"turn {j}: <image> in a {m['role']} turn (images go in user turns)")
    n_placeholders = sum(p["type"] == "image" for m in sample.messages for p in m["content"])
    if n_placeholders != len(sample.images):
        problems.append(f"{n_placeholders} <image> placeholder(s) but {len(sample.images)} image(s)")
    return problems


def load_samples(path) -> tuple[list[Sample], list[DataError]]:
    """Parse every record; structural problems come back as errors, never raised."""
    records, errors = read_records(path)
    samples = []
    for record in records:
        try:
            sample = parse_record(record)
        except DataError as e:
            errors.append(e)
            continue
        problems = structural_problems(sample)
        if problems:
            errors.extend(DataError(sample.where, p) for p in problems)
            continue
        samples.append(sample)
    return samples, errors
