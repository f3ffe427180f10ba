"""assistant.explain: one map per image over its patch grid, deterministic, peaking on the object asked about for
the default model; image reliance; every projector; and the map through batch VQA's --explain."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import image_question, random_image, tiny_config

from assistant.explain import explain, heatmap
from assistant.model.builder import build_model
from assistant.weights.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "qformer"])
def test_one_map_per_image_over_its_patches_and_deterministic(tiny_llm_dir, projector):
    kwargs = {"num_queries": 4, "qformer": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                            "intermediate_size": 64}} if projector == "qformer" else {}
    model, processor = build_model(tiny_config(tiny_llm_dir, projector=projector, **kwargs))
    images = [random_image(1), random_image(2)]
    messages = image_question("Compare them.", n_images=2)
    first = explain(model, processor, messages, images, "They differ.")
    again = explain(model, processor, messages, images, "They differ.")
    side = int(model.vision_tower.num_patches ** 0.5)
    assert len(first.maps) == 2 and all(m.shape == (side, side) for m in first.maps)
    assert all(torch.equal(a, b) for a, b in zip(first.maps, again.maps))
    assert all(abs(float(m.sum()) - 1) < 1e-5 or float(m.sum()) == 0 for m in first.maps)
    assert first.reliance == again.reliance and first.answer_tokens >= 1
    occluded = explain(model, processor, messages, images, "They differ.", method="occlusion", reliance=False)
    assert [m.shape for m in occluded.maps] == [m.shape for m in first.maps] and occluded.reliance is None
    with pytest.raises(ValueError, match="no image"):
        explain(model, processor, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], [], "hello")


@pytest.mark.parametrize("runtime", ["plain", "cpu int8"])
def test_the_default_model_looks_at_the_one_object_in_a_scene(runtime):
    from assistant.weights.loading import load_for_inference, load_model
    from finetune.scenes import IMAGE_SIZE, SIZES, Thing, render

    if runtime == "plain":
        model, processor = load_model("default")
    else:  # what serve.py runs by default: int8 layers, fused projections, the CPU attention function
        model, processor, _ = load_for_inference("default", quantize="int8")
    side = int(model.vision_tower.num_patches ** 0.5)
    cell = IMAGE_SIZE / side
    placed = [Thing("triangle", "green", "large", 22, 70), Thing("circle", "blue", "large", 74, 24),
              Thing("star", "red", "large", 70, 72)]
    for thing in placed:
        image = render([thing], random.Random(0))
        messages = image_question(f"What color is the {thing.shape}?\nAnswer the question using a single word or "
                                  "phrase.")
        e = explain(model, processor, messages, [image], thing.colour)
        assert e.method == "gradient", e.notes  # not the occlusion fallback
        row, col = e.peak()
        r = SIZES[thing.size]
        assert col * cell < thing.x + r and thing.x - r < (col + 1) * cell, (thing, e.peak())
        assert row * cell < thing.y + r and thing.y - r < (row + 1) * cell, (thing, e.peak())
        assert e.reliance > 1.0  # a colour cannot be guessed from a blank image
        assert heatmap(image, e.maps[0]).size == image.size


def test_batch_vqa_writes_a_heatmap_and_the_numbers_per_answer(tiny_llm_dir, tmp_path):
    model, processor = build_model(tiny_config(tiny_llm_dir))
    save_checkpoint(model, processor, tmp_path / "model")
    (tmp_path / "images").mkdir()
    for i in range(2):
        random_image(i).save(tmp_path / "images" / f"{i}.png")
    rows = [{"question_id": f"q/{i}", "image": f"{i}.png", "question": "What is it?"} for i in range(2)]
    rows.append({"question_id": "text", "question": "Hello?"})  # no image: nothing to map, still answered
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "-m", "assistant.vqa", "run", "--model", str(tmp_path / "model"),
                           "--questions", str(tmp_path / "q.jsonl"), "--image-root", str(tmp_path / "images"), "--output", str(tmp_path / "a.jsonl"),
                           "--explain", str(tmp_path / "maps"), "--max-new-tokens", "4"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + (tmp_path / "a.jsonl").read_text()
    answers = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    side = int(model.vision_tower.num_patches ** 0.5)
    for row in answers[:2]:
        e = row["explanation"]
        assert len(e["maps"]) == 1 and len(e["maps"][0]) == side and "reliance" in e
        assert (tmp_path / "maps" / e["heatmap"]).is_file()
    assert answers[0]["explanation"]["heatmap"] == "q_0.png"  # a question id is never a path
    assert "explanation" not in answers[2] and answers[2]["answer"] is not None
