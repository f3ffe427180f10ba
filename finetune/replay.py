"""Replay: the starting model's own kind of data mixed back into a fine-tune, so it keeps what it knew.

Training only on a new domain overwrites what the adapter had learnt (for the default model: its scenes,
easy-VQA and plain chat). `data.replay` names data of the old kind: `default` for the default model's own
(drawn scenes, easy-VQA's train split, text chat), or a file (LLaVA / messages JSON or JSONL) for any model.
`data.replay_share` of each epoch's tokens are drawn from it. A slice of it is held out (never trained on)
for the skill check in finetune/skills.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from .data import DataError, Sample, load_samples

NONE_VALUES = (None, "", "none", "no", "null")
REPLAY_SCENES = 1500  # drawn scenes in the default replay pool (seed 0: the scenes the default learnt from)
HELD_OUT = 100  # samples of a replay file kept back for the skill check


@dataclass
class ReplayData:
    """Samples to mix in, each with its image root, and the held-out sets the skill check reads."""
    name: str
    samples: list[Sample] = field(default_factory=list)
    roots: list = field(default_factory=list)
    # skill name -> (samples, image roots): held-out data of the old kind
    skill_sets: dict[str, tuple[list[Sample], list]] = field(default_factory=dict)
    text_questions: bool = False  # the plain-chat check (finetune/skills.py TEXT_QUESTIONS) applies


def wanted(replay) -> bool:
    return replay not in NONE_VALUES


def load_replay(replay: str, image_root: str | None, seed: int, log) -> ReplayData:
    if replay == "default":
        return default_replay(log)
    path = Path(replay)
    if not path.is_file():
        raise DataError(f"data.replay = {replay!r}", "neither 'default', 'none' nor a data file")
    samples, errors = load_samples(path)
    if errors:
        shown = "\n  ".join(str(e) for e in errors[:10])
        raise DataError(f"data.replay {path}", f"{len(errors)} problem(s):\n  {shown}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = min(HELD_OUT, len(samples) // 5)  # a small file keeps most of itself for replay
    held_out = [samples[i] for i in order[:held]]
    kept = [samples[i] for i in order[held:]]
    skill_sets = {f"held-out {path.name}": (held_out, [image_root] * len(held_out))} if held_out else {}
    return ReplayData(path.name, kept, [image_root] * len(kept), skill_sets)


def default_replay(log, pool: bool = True) -> ReplayData:
    """The default model's training mix, drawn and converted once into the cache: its scenes (train split for
    replay, test split for the check), easy-VQA (train for replay, test for the check) and its text chat.
    `pool=False`: only the held-out sets, for a skill check without replay."""
    from assistant.weights.llm import cache_root

    from .easyvqa_conversations import convert
    from .scenes import write_split

    cache = cache_root() / "replay" / "default"
    scenes = cache / "scenes"
    if not (scenes / "test_questions.jsonl").is_file():
        log(f"drawing the default model's scenes for replay into {scenes} (once)")
        scenes.mkdir(parents=True, exist_ok=True)
        write_split(scenes, "train", REPLAY_SCENES, seed=0)
        write_split(scenes, "test", 100, seed=0)
    skill_sets = {
        "scenes (held out)": _question_samples(scenes / "test_questions.jsonl", scenes / "images", 100),
        "easy-VQA test": _easyvqa_test(100),
    }
    if not pool:
        return ReplayData("default", [], [], skill_sets, text_questions=True)
    easy = cache / "easyvqa_train.jsonl"
    if not easy.is_file():
        log(f"converting easy-VQA's train split for replay into {easy} (once)")
        tmp = easy.with_suffix(".tmp")
        convert(tmp)
        tmp.replace(easy)
    text = Path(__file__).with_name("text_chat.jsonl")
    parts = [(scenes / "train.jsonl", scenes / "images", 1), (easy, "easy-vqa:train", 1), (text, None, 8)]
    samples, roots = [], []
    for path, root, repeat in parts:
        more, errors = load_samples(path)
        if errors:
            raise DataError(f"data.replay {path}", str(errors[0]))
        samples += more * repeat
        roots += [root] * (len(more) * repeat)
    return ReplayData("default", samples, roots, skill_sets, text_questions=True)


def _question_samples(path: Path, root, limit: int) -> tuple[list[Sample], list]:
    """The first `limit` questions of a questions file (question_id, image, question, answer) as samples."""
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines()[:limit]]
    out = [_one_question(q["question_id"], q["image"], q["question"], q["answer"], f"{path}:{k + 1}")
           for k, q in enumerate(rows)]
    return out, [root] * len(out)


def _easyvqa_test(limit: int) -> tuple[list[Sample], list]:
    from assistant.vqa.easy_vqa import questions

    out = [_one_question(q["question_id"], q["image"], q["question"][0].upper() + q["question"][1:], q["answer"],
                         f"easy-VQA test {q['question_id']}") for q in questions("test")[:limit]]
    return out, ["easy-vqa:test"] * len(out)


def _one_question(question_id, image: str, question: str, answer: str, where: str) -> Sample:
    """An image, its question with the short-answer prompt the default model learnt with, and the answer."""
    from .data import RawRecord, parse_record
    from .scenes import SHORT

    record = {"id": question_id, "image": image, "conversations": [
        {"from": "human", "value": f"<image>\n{question}\n{SHORT}"}, {"from": "gpt", "value": answer}]}
    return parse_record(RawRecord(0, None, record, where))


def mix(samples: list, roots: list, replay: ReplayData, share: float, seed: int, length) -> tuple[list, list, int]:
    """`samples` plus replay samples making up `share` of the result's tokens (`length(sample)` estimates a
    sample's), drawn without repeats until the pool runs out. Counted in tokens, not samples: a replayed scene
    conversation can be ten times as long as a one-question sample of the new data, and would otherwise take most
    of the training. Returns (samples, roots, number of replay samples)."""
    if not replay.samples or share <= 0:
        return samples, roots, 0
    wanted_tokens = sum(length(s) for s in samples) * share / (1 - share)
    rng = random.Random(seed)
    order, tokens, pool = [], 0, []
    while tokens < wanted_tokens:
        if not pool:
            pool = list(range(len(replay.samples)))
            rng.shuffle(pool)
        i = pool.pop()
        order.append(i)
        tokens += length(replay.samples[i])
    return (samples + [replay.samples[i] for i in order], roots + [replay.roots[i] for i in order], len(order))


def token_estimate(processor):
    """A sample -> about how many tokens it takes: its text through the tokenizer, each image's positions and a
    few tokens of the template's per message."""
    tokenizer, per_image = processor.tokenizer, processor.chat.tokens_per_image

    def length(sample: Sample) -> int:
        text = " ".join(part.get("text", "") for m in sample.messages for part in m["content"]
                        if isinstance(part, dict))
        return len(tokenizer(text, add_special_tokens=False).input_ids) + per_image * len(sample.images) + \
            5 * len(sample.messages)

    return length
