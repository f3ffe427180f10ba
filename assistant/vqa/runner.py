"""Answering a list of questions: batched, appended as produced, resumable, never stopped by one bad item."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from ..inference.engine import Engine
from ..inference.generation import GenerationConfig
from ..inputs.images import ImageError, load_image
from ..inputs.paths import PathEscapeError, resolve_under_root


def answered_ids(output: Path) -> set[str]:
    """Ids already in the output; a last line cut off by a kill is removed first."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        output.write_bytes(data)
    done = set()
    for line in data.decode("utf-8").splitlines():
        try:
            done.add(str(json.loads(line)["question_id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def run_questions(engine: Engine, items: list[dict], output: Path, image_root, *, batch_size: int = 16,
                  max_new_tokens: int = 16, prompt_suffix: str = "", progress: bool = True,
                  explain_dir: Path | None = None) -> dict:
    """Answer every item not yet in `output`; returns counts {"answered", "failed", "skipped", "seconds"}.
    With `explain_dir`, each answer about an image also gets its relevance map: the numbers in its answer row,
    a heatmap PNG in that folder (assistant/explain.py)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    done = answered_ids(output)
    todo = [it for it in items if str(it["question_id"]) not in done]
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    counts = {"answered": 0, "failed": 0, "skipped": len(items) - len(todo)}
    started = time.time()
    bar = tqdm(total=len(todo), disable=not progress, unit="q", dynamic_ncols=True, desc="vqa")
    with open(output, "a", encoding="utf-8") as out:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            ready, records = [], {}
            for it in batch:
                try:
                    ready.append((it, prepare_item(it, image_root, prompt_suffix)))
                except (ImageError, PathEscapeError, ValueError) as e:
                    records[id(it)] = {"question_id": it["question_id"], "error": str(e)}
            prepared = {id(it): conversation for it, conversation in ready}
            for it, answer in _answer(engine, ready, config):
                if isinstance(answer, Exception):
                    records[id(it)] = {"question_id": it["question_id"], "error": str(answer)}
                else:
                    records[id(it)] = {"question_id": it["question_id"], "question": it["question"], "answer": answer}
                    messages, images = prepared[id(it)]
                    if explain_dir is not None and images:
                        records[id(it)]["explanation"] = _explanation(engine, it, messages, images, answer,
                                                                      explain_dir)
            for it in batch:  # in input order
                record = records[id(it)]
                counts["failed" if "error" in record else "answered"] += 1
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(batch))
    bar.close()
    counts["seconds"] = time.time() - started
    return counts


def _explanation(engine: Engine, item, messages, images, answer: str, folder: Path) -> dict:
    from ..explain import heatmap

    e = engine.explain(messages, images, answer)
    folder.mkdir(parents=True, exist_ok=True)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(item["question_id"])) + ".png"
    heatmap(images[0], e.maps[0]).save(folder / name)
    return {**{k: v for k, v in e.to_dict().items() if k != "seconds"}, "heatmap": name}


def _answer(engine: Engine, ready, config):
    """(item, answer) for a batch; where the batch fails on a prompt the model cannot take, item by item, so that
    each such item gets its own error and the others their answers."""
    if not ready:
        return []
    try:
        answers = engine.answer_batch([r[1][0] for r in ready], [r[1][1] for r in ready], config)
        return [(it, a) for (it, _), a in zip(ready, answers)]
    except ValueError as e:
        if len(ready) == 1:
            return [(ready[0][0], e)]
        return [pair for r in ready for pair in _answer(engine, [r], config)]


def prepare_item(item: dict, image_root, prompt_suffix: str):
    question = (item.get("question") or "").strip()
    if not question:
        raise ValueError("empty question")
    text = f"{question}\n{prompt_suffix}" if prompt_suffix else question
    content = [{"type": "text", "text": text}]
    images = []
    if item.get("image"):
        images = [load_image(resolve_under_root(image_root, item["image"]))]
        content = [{"type": "image"}] + content
    return [{"role": "user", "content": content}], images
