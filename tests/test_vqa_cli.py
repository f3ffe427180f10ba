"""python -m assistant.vqa: bad items, resumable output, path escapes, scoring."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import random_image, tiny_config

from assistant.model.builder import build_model
from assistant.weights.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_llm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-model")
    model, processor = build_model(tiny_config(tiny_llm_dir))
    save_checkpoint(model, processor, out)
    return out


@pytest.fixture
def questions(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        random_image(i).save(images / f"{i}.png")
    (images / "empty.png").write_bytes(b"")
    (tmp_path / "secret.png").write_bytes((images / "0.png").read_bytes())
    rows = [{"question_id": i, "image": f"{i % 3}.png", "question": "What colour?", "answers": ["red"]}
            for i in range(30)]
    rows += [{"question_id": "missing", "image": "nope.png", "question": "x?"},
             {"question_id": "empty-image", "image": "empty.png", "question": "x?"},
             {"question_id": "no-question", "image": "0.png", "question": ""},
             {"question_id": "escape", "image": "../secret.png", "question": "x?"},
             {"question_id": "absolute", "image": str(tmp_path / "secret.png"), "question": "x?"}]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def vqa(*args, **kw):
    args = list(args)
    if "--questions" in args:
        args += ["--image-root", Path(args[args.index("--questions") + 1]).parent / "images"]
    return subprocess.run([sys.executable, "-m", "assistant.vqa", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, **kw)


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_bad_items_become_error_lines_and_the_run_goes_on(tiny_model_dir, questions, tmp_path):
    out, metrics = tmp_path / "answers.jsonl", tmp_path / "metrics.json"
    proc = vqa("run", "--model", tiny_model_dir, "--questions", questions, "--output", out,
               "--metrics-out", metrics, "--batch-size", "8", "--max-new-tokens", "3")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "30 answered, 5 failed" in proc.stdout
    records = {str(r["question_id"]): r for r in read(out)}
    assert len(records) == 35
    assert "not found" in records["missing"]["error"]
    assert "empty" in records["empty-image"]["error"]
    assert "empty question" in records["no-question"]["error"]
    assert "leaves the image root" in records["escape"]["error"]
    assert "absolute image path" in records["absolute"]["error"]
    assert json.loads(metrics.read_text())["count"] == 30
    # a second run skips everything
    again = vqa("run", "--model", tiny_model_dir, "--questions", questions, "--output", out, "--max-new-tokens", "3")
    assert "0 answered, 0 failed, 35 already in" in again.stdout
    assert len(read(out)) == 35


def test_killed_run_resumes_with_every_id_exactly_once(tiny_model_dir, questions, tmp_path):
    out = tmp_path / "answers.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "assistant.vqa", "run", "--model", str(tiny_model_dir),
                             "--questions", str(questions), "--image-root", str(questions.parent / "images"),
                             "--output", str(out), "--batch-size", "1",
                             "--max-new-tokens", "8"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not out.exists() or len(out.read_text().splitlines()) < 5:
        assert proc.poll() is None and time.time() < deadline, "finished before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(out, "a") as f:
        f.write('{"question_id": 29, "answ')  # a line cut off mid-write
    partial = len(out.read_text().splitlines())
    assert 5 <= partial < 36
    vqa("run", "--model", tiny_model_dir, "--questions", questions, "--output", out, "--max-new-tokens", "8")
    ids = [str(r["question_id"]) for r in read(out)]
    assert len(ids) == 35 and len(set(ids)) == 35


def test_score_command_scores_anyones_answers(tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"question_id": 1, "answer": "Two"}\n{"question_id": 2, "answer": "cat"}\n')
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotations": [
        {"question_id": 1, "question_type": "how many", "answer_type": "number",
         "answers": [{"answer": "2"}] * 10},
        {"question_id": 2, "question_type": "what", "answer_type": "other",
         "answers": [{"answer": "cat"}] * 2 + [{"answer": "dog"}] * 8},
        {"question_id": 3, "question_type": "what", "answer_type": "other", "answers": [{"answer": "x"}] * 10}]}))
    proc = vqa("score", "--predictions", preds, "--annotations", ann, "--metrics-out", tmp_path / "m.json")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["count"] == 2 and m["missing"] == 1
    assert m["vqa_accuracy"] == pytest.approx(100 * (1.0 + 0.6) / 2)
    assert m["by_answer_type"]["number"]["vqa_accuracy"] == 100.0


def test_unreadable_inputs_are_clear_errors(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "question": "x"}\n{oops\n')
    proc = vqa("run", "--questions", bad, "--output", tmp_path / "o.jsonl")
    assert proc.returncode == 2 and "q.jsonl:2: invalid JSON" in proc.stderr
    proc = vqa("score", "--predictions", tmp_path / "none.jsonl", "--annotations", bad)
    assert proc.returncode == 2 and "q.jsonl:2: invalid JSON" in proc.stderr
    good = tmp_path / "a.jsonl"
    good.write_text('{"question_id": 1, "answer": "x"}\n')
    proc = vqa("score", "--predictions", tmp_path / "none.jsonl", "--annotations", good)
    assert proc.returncode == 2 and "none.jsonl: file not found" in proc.stderr


def test_compile_auto_compiles_batch_1_steps_only():
    from assistant.vqa.cli import build_parser, compiles_decode_steps

    assert build_parser().parse_args(["run", "--dataset", "easy-vqa:test", "--output", "x"]).compile == "auto"
    assert compiles_decode_steps("auto", 1)  # chat-like batch 1: about 3x faster steps, always worth it
    assert not compiles_decode_steps("auto", 16)  # packed batches step only their unfinished rows, eagerly
    assert compiles_decode_steps("always", 16) and not compiles_decode_steps("never", 1)


def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(tiny_model_dir, questions, tmp_path):
    for output, reason in ((tmp_path, "a directory"), (questions / "answers.jsonl", f"{questions} is a file")):
        proc = vqa("run", "--model", tiny_model_dir, "--questions", questions, "--output", output)
        assert proc.returncode == 2 and f"--output {output}: {reason}" in proc.stderr, proc.stderr[-2000:]
