"""Question files: our JSONL, the official VQAv2 questions + annotations pair, built-in datasets."""

from __future__ import annotations

import json
from pathlib import Path


class InputError(ValueError):
    """A questions or annotations file that cannot be read; the message says where."""


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(item, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object")
        item["_line"] = lineno
        items.append(item)
    return items


def load_questions(path, annotations=None) -> list[dict]:
    """-> [{"question_id", "image", "question", optional "answers", "question_type", "answer_type"}]."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.suffix == ".json":
        items = _vqav2_questions(path)
    else:
        items = []
        for item in read_jsonl(path):
            where = f"{path}:{item['_line']}"
            if "question_id" not in item:
                raise InputError(f"{where}: missing 'question_id'")
            answers = item.get("answers", [item["answer"]] if "answer" in item else None)
            if answers is not None and (not isinstance(answers, list) or not answers):
                raise InputError(f"{where}: 'answers' must be a non-empty list")
            answers = [a["answer"] if isinstance(a, dict) else str(a) for a in answers] if answers else None
            items.append({"question_id": item["question_id"], "image": item.get("image"),
                          "question": item.get("question"), "answers": answers,
                          "question_type": item.get("question_type"), "answer_type": item.get("answer_type")})
    ids = [it["question_id"] for it in items]
    if len(set(map(str, ids))) != len(ids):
        raise InputError(f"{path}: question ids are not unique")
    if annotations:
        by_id = load_annotations(annotations)
        for it in items:
            ann = by_id.get(str(it["question_id"]))
            if ann:
                it.update({k: v for k, v in ann.items() if v is not None})
    return items


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def _vqav2_questions(path: Path) -> list[dict]:
    data = _read_json(path)
    if not isinstance(data, dict) or "questions" not in data:
        raise InputError(f"{path}: expected the VQAv2 questions format ({{'questions': [...]}})")
    subtype = data.get("data_subtype", "val2014")
    out = []
    for q in data["questions"]:
        image = q.get("image") or f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"
        out.append({"question_id": q["question_id"], "image": image, "question": q["question"], "answers": None,
                    "question_type": None, "answer_type": None})
    return out


def load_annotations(path) -> dict[str, dict]:
    """VQAv2 annotations JSON, or JSONL with question_id + answers/answer -> {question_id: fields}."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.suffix == ".json":
        data = _read_json(path)
        if not isinstance(data, dict) or "annotations" not in data:
            raise InputError(f"{path}: expected the VQAv2 annotations format ({{'annotations': [...]}})")
        return {str(a["question_id"]): {"answers": [x["answer"] for x in a["answers"]],
                                        "question_type": a.get("question_type"), "answer_type": a.get("answer_type")}
                for a in data["annotations"]}
    out = {}
    for item in read_jsonl(path):
        answers = item.get("answers", [item["answer"]] if "answer" in item else None)
        if "question_id" not in item or not answers:
            raise InputError(f"{path}:{item['_line']}: expected 'question_id' and 'answers' (or 'answer')")
        out[str(item["question_id"])] = {
            "answers": [a["answer"] if isinstance(a, dict) else str(a) for a in answers],
            "question_type": item.get("question_type"), "answer_type": item.get("answer_type")}
    return out


def builtin_dataset(name: str) -> tuple[list[dict], Path]:
    """'easy-vqa:test' -> (questions with answers, image root)."""
    if name.startswith("easy-vqa:"):
        from .easy_vqa import image_root, questions

        split = name.split(":", 1)[1]
        qs = questions(split)
        return ([{**q, "answers": [q.pop("answer")], "answer_type": None} for q in qs], image_root(split))
    raise InputError(f"unknown dataset {name!r}; known: easy-vqa:test, easy-vqa:train")
