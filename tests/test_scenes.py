"""The synthetic scenes the default model is trained and measured on (finetune/scenes.py)."""

from __future__ import annotations

import collections
import json
import math
import random

import pytest

from finetune.scenes import (
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    SIZES,
    main,
    plural,
    questions,
    sample_scene,
    write_split,
)


def scenes(split, count=400):
    for i in range(count):
        rng = random.Random(f"test-{split}-{i}")
        things = sample_scene(rng, split)
        yield things, questions(things, rng)


def test_the_same_seed_writes_the_same_files_with_any_number_of_workers(tmp_path):
    for name, seed, workers in (("a", 0, 1), ("b", 0, 2), ("c", 1, 1)):
        (tmp_path / name).mkdir()
        write_split(tmp_path / name, "test", 6, seed=seed, workers=workers)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 4 + 6
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a" / "test.jsonl").read_text() != (tmp_path / "c" / "test.jsonl").read_text()


def test_held_out_pairs_appear_only_in_the_compositions_split():
    for split in ("train", "test"):
        pairs = {(t.colour, t.shape) for things, _ in scenes(split) for t in things}
        assert not pairs & HELD_OUT_PAIRS, split
        assert len(pairs) == len(COLOURS) * len(SHAPES) - len(HELD_OUT_PAIRS), split  # every other pair occurs
    assert all(any((t.colour, t.shape) in HELD_OUT_PAIRS for t in things) for things, _ in scenes("compositions"))


def test_scenes_and_questions_cover_what_the_model_must_learn():
    counts, colours, sizes, types, existence = set(), set(), set(), collections.Counter(), collections.Counter()
    for things, qs in scenes("train"):
        counts.add(len(things))
        colours |= {t.colour for t in things}
        sizes |= {t.size for t in things}
        for a, b in ((a, b) for i, a in enumerate(things) for b in things[i + 1:]):
            assert math.hypot(a.x - b.x, a.y - b.y) > SIZES[a.size] + SIZES[b.size], "objects overlap"
        for qtype, question, answer in qs:
            types[qtype] += 1
            if qtype == "exist":
                existence[answer] += 1
    assert counts == {1, 2, 3, 4, 5, 6} and len(colours) >= 8 and sizes == {"small", "large"}
    assert set(types) == {"colour", "shape", "count", "exist", "position", "relation", "size"}
    assert 0.45 <= existence["yes"] / sum(existence.values()) <= 0.55


def test_count_questions_name_each_shape_in_its_plural():
    asked = {q for _, qs in scenes("train") for qtype, q, _ in qs
             if qtype == "count" and "objects" not in q and "shapes" not in q}
    assert asked == {f"How many {p} are there?" for p in
                     ("circles", "squares", "triangles", "stars", "diamonds", "crosses")}


def test_count_drills_ask_every_shape_on_scenes_of_the_training_distribution(tmp_path):
    write_split(tmp_path, "counting", 40, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "counting_questions.jsonl").read_text().splitlines()]
    assert {r["question_type"] for r in rows} == {"count"}
    by_image = collections.defaultdict(dict)
    for r in rows:
        by_image[r["image"]][r["question"]] = int(r["answer"])
    assert len(by_image) == 40 and all(len(qs) == 8 for qs in by_image.values())
    for qs in by_image.values():
        shape_counts = [qs[f"How many {plural(s)} are there?"] for s in SHAPES]
        totals = [n for q, n in qs.items() if q in ("How many objects are there?", "How many shapes are in the image?")]
        assert totals == [sum(shape_counts)]
    captions = (tmp_path / "counting_captions.jsonl").read_text()
    assert not any(f"{colour} {shape}" in captions for colour, shape in HELD_OUT_PAIRS)


@pytest.mark.parametrize("option, value", [("--counting", "-3"), ("--train", "-1"), ("--workers", "0")])
def test_bad_counts_are_a_clear_error(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "scenes"), "--train", "1", "--test", "1", option, value])
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err and not (tmp_path / "scenes").exists()
