"""The external easy-VQA dataset (pip install easy-vqa; MIT): 64x64 shape images, 13 answers.

Its train split may be used for training (finetune converts it); its test split is for evaluation
only (`python -m assistant.vqa run --dataset easy-vqa:test`)."""

from __future__ import annotations

from pathlib import Path


def _package():
    try:
        import easy_vqa
    except ImportError:
        raise RuntimeError("the easy-VQA dataset needs its package: pip install easy-vqa==1.0") from None
    return easy_vqa


def image_root(split: str) -> Path:
    return Path(_package().__file__).parent / "data" / split / "images"


def questions(split: str) -> list[dict]:
    """[{"question_id", "image", "question", "answer", "question_type"}] with image paths relative
    to image_root(split)."""
    pkg = _package()
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA has splits 'train' and 'test', not {split!r}")
    qs, answers, image_ids = pkg.get_train_questions() if split == "train" else pkg.get_test_questions()
    out = []
    for k, (q, a, img) in enumerate(zip(qs, answers, image_ids)):
        out.append({"question_id": f"easyvqa-{split}-{k}", "image": f"{img}.png", "question": q, "answer": a,
                    "question_type": question_type(q)})
    return out


def question_type(question: str) -> str:
    q = question.lower()
    if q.startswith(("is ", "does ", "is there", "are ")):
        return "yes/no"
    if "color" in q or "colour" in q:
        return "color"
    return "shape"
