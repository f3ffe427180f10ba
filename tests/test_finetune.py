"""Fine-tuning: data validation, masking, truncation, every stage on tiny models, 2 processes,
and kill -9 then resume giving the same weights as an uninterrupted run."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_VISION, tiny_config
from PIL import Image
from safetensors.torch import load_file

from assistant.model.builder import build_model
from assistant.inputs.chat_format import IGNORE_INDEX
from finetune.data import DataError, load_samples, resolve_image
from finetune.dataset import Collator, InstructionDataset, fit_to_length
from finetune.scenes import write_split
from finetune.validate import validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    write_split(out, "train", 24, seed=0)
    write_split(out, "test", 6, seed=0)
    return out


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def conv(image="a.png", question="<image>\nWhat is it?", answer="A cat."):
    sample = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        sample["image"] = image
    return sample


def test_validation_reports_every_kind_of_problem_with_its_place(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "outside.png").write_bytes((root / "a.png").read_bytes())
    os.symlink(tmp_path / "outside.png", root / "link.png")
    rows = [
        {"id": "ok", **conv()},
        "{not json",
        {"id": "missing", **conv("nope.png")},
        {"id": "unreadable", **conv("broken.png")},
        {"id": "count", **conv("a.png", question="<image><image>\nTwo?")},
        {"id": "order", "image": "a.png", "conversations": [{"from": "gpt", "value": "hi"},
                                                           {"from": "human", "value": "<image>\nx"}]},
        {"id": "empty", **conv("a.png", answer="")},
        {"id": "dots", **conv("../outside.png")},
        {"id": "absolute", **conv(str(tmp_path / "outside.png"))},
        {"id": "symlink", **conv("link.png")},
        {"id": "speaker", "conversations": [{"from": "robot", "value": "x"}]},
        {"id": "text-only", **conv(None, question="Hello?", answer="Hi.")},
    ]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    report = validate(data, root)
    text = "\n".join(map(str, report.problems))
    expectations = [
        ("data.jsonl:2", "invalid JSON"), ("id missing", "not found"), ("id unreadable", "corrupt or truncated"),
        ("id count", "2 <image> placeholder(s) but 1 image(s)"), ("id order", "must start with a user turn"),
        ("id empty", "is empty"), ("id dots", "leaves the image root"), ("id absolute", "absolute image path"),
        ("id symlink", "outside the image root"), ("id speaker", "unknown speaker"),
    ]
    for where, message in expectations:
        assert any(where in str(p) and message in str(p) for p in report.problems), f"{where}: {message}\n{text}"
    assert report.valid == 2 and report.samples == 12
    # the command line says the same and exits 1
    cli = subprocess.run([sys.executable, "-m", "finetune.validate", str(data), "--image-root", str(root)],
                         capture_output=True, text=True)
    assert cli.returncode == 1 and "2 of 12 samples valid" in cli.stdout and "data.jsonl:2" in cli.stdout


def test_too_long_samples_are_reported_with_token_counts(tiny_llm_dir, tmp_path):
    _, processor = build_model(tiny_config(tiny_llm_dir))
    data = write_jsonl(tmp_path / "d.jsonl", [conv(None, question="word " * 300, answer="ok")])
    report = validate(data, None, processor, max_length=100)
    assert "too long" in str(report.problems[0]) and "> max_length 100" in str(report.problems[0])


def test_messages_format_and_multi_image(tmp_path):
    data = write_jsonl(tmp_path / "m.jsonl", [{"id": 1, "images": ["a.png", "b.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}]},
        {"role": "assistant", "content": "Same."}]}])
    [sample], errors = load_samples(data)
    assert not errors
    assert [p["type"] for p in sample.messages[0]["content"]] == ["image", "text", "image"]


def test_truncation_drops_whole_turns_never_image_positions(tiny_llm_dir):
    _, processor = build_model(tiny_config(tiny_llm_dir))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A1"}]}]
    for k in range(2, 8):
        messages += [{"role": "user", "content": [{"type": "text", "text": f"Question number {k}?"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": f"Answer {k}."}]}]
    full = processor.chat.encode(messages, add_generation_prompt=False, with_labels=True)
    encoded, dropped = fit_to_length(processor, messages, len(full.input_ids) - 10)
    assert dropped >= 1 and len(encoded.input_ids) <= len(full.input_ids) - 10
    assert encoded.input_ids.count(processor.image_token_id) == processor.chat.tokens_per_image
    assert processor.tokenizer.decode([t for t, l in zip(encoded.input_ids, encoded.labels) if l != IGNORE_INDEX]) \
        .startswith("A1<|im_end|>")
    encoded, _ = fit_to_length(processor, messages[:2], 10)
    assert encoded is None  # the first exchange alone does not fit: skipped, not cut


def test_bad_image_mid_training_is_skipped_and_counted(tiny_llm_dir, tmp_path):
    _, processor = build_model(tiny_config(tiny_llm_dir))
    (tmp_path / "bad.png").write_bytes(b"")
    data = write_jsonl(tmp_path / "d.jsonl", [conv("bad.png")])
    samples, _ = load_samples(data)
    ds = InstructionDataset(samples, [tmp_path], processor, 256)
    assert ds[0]["skipped"] == "skipped_bad_image" and ds[0]["error"]
    batch = Collator(processor)([ds[0]])  # the count travels with the batch (DataLoader workers)
    assert set(batch) == {"skipped"} and batch["skipped"]["skipped_bad_image"] == 1


def test_image_root_escape_is_refused(tmp_path):
    for path in ("../x.png", "/etc/passwd", "a/../../x.png"):
        with pytest.raises(DataError):
            resolve_image(tmp_path, path, "here")


def tiny_recipe(tmp_path, llm_dir, scenes, stage="instruct", **train):
    model_config = tiny_config(llm_dir).to_dict()
    cfg = {
        "stage": stage, "init": None, "model_config": model_config,
        "vision": "frozen", "projector": "full", "llm": "lora" if stage == "instruct" else "frozen",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(scenes / "train.jsonl"), "image_root": str(scenes / "images"),
                 "eval": str(scenes / "test.jsonl"), "eval_max_samples": 4, "max_length": 400},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 6, "batch_size": 2, "lr": 1e-3,
                  "log_every": 1, "save_every": 3, "eval_every": 6, "seed": 1, **train},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_finetune(*args, check=True, **kw):
    proc = subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_stage_trains_and_output_is_a_model_spec(tiny_llm_dir, tmp_path, scenes, stage):
    recipe = tiny_recipe(tmp_path, tiny_llm_dir, scenes, stage)
    run_finetune("--config", recipe)
    out = tmp_path / "out"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert any("eval_loss" in e for e in log)
    assert (out / "training_curves.png").stat().st_size > 1000
    assert (out / "adapter").is_dir() == (stage == "instruct")
    from assistant.weights.loading import load_model

    model, processor = load_model(str(out))
    assert model.config.trained


def test_bf16_training_keeps_what_it_saves_in_fp32(tiny_llm_dir, tmp_path, scenes):
    """train.mixed_precision=bf16 (what auto picks on CPUs with fast bf16): the frozen LLM weights are held in bf16,
    but the checkpoint's vision tower, projector and adapter stay fp32, and the loss is finite."""
    recipe = tiny_recipe(tmp_path, tiny_llm_dir, scenes, "instruct", mixed_precision="bf16", max_steps=3)
    run_finetune("--config", recipe)
    out = tmp_path / "out"
    for name in ("vision_tower.safetensors", "projector.safetensors", "adapter/adapter_model.safetensors"):
        assert {t.dtype for t in load_file(str(out / name)).values()} == {torch.float32}, name
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(0 < loss < 100 for loss in losses)


def test_clip_stage_produces_a_vision_tower(tiny_llm_dir, tmp_path, scenes):
    cfg = {"stage": "clip", "data": {"train": str(scenes / "train_captions.jsonl"),
                                     "image_root": str(scenes / "images"), "num_workers": 2},
           "clip": {"image_size": 32, "vision": {k: v for k, v in TINY_VISION["clip"].items() if k != "image_size"},
                    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                             "num_attention_heads": 2}, "projection_dim": 16},
           "train": {"output_dir": str(tmp_path / "clip"), "max_steps": 3, "batch_size": 8, "log_every": 1}}
    (tmp_path / "clip.yaml").write_text(yaml.safe_dump(cfg))
    run_finetune("--config", tmp_path / "clip.yaml")
    from assistant.model.config import ModelConfig, VisionConfig

    config = tiny_config(tiny_llm_dir)
    config.vision = VisionConfig(model_type="clip", pretrained=str(tmp_path / "clip"))
    model, _ = build_model(config)
    clip_weights = load_file(str(tmp_path / "clip" / "model.safetensors"))
    ours = model.vision_tower.model.state_dict()
    key = next(k for k in ours if k.endswith("embeddings.patch_embedding.weight"))
    assert torch.equal(ours[key], clip_weights["vision_model.embeddings.patch_embedding.weight"])
    assert isinstance(config, ModelConfig)


def test_the_custom_recipe_trains_a_model_for_its_time_budget(tiny_llm_dir, tmp_path, scenes):
    """configs/train/custom.yaml as the README uses it, from a tiny model, for a few seconds: the budget (not an
    epoch count) ends the run, the start line says so, the last step is logged, the result is a model spec."""
    from assistant.weights.checkpoint import save_checkpoint
    from assistant.weights.loading import load_model

    model, processor = build_model(tiny_config(tiny_llm_dir))
    save_checkpoint(model, processor, tmp_path / "start")
    proc = run_finetune("--config", ROOT / "configs/train/custom.yaml", "--data", scenes / "train.jsonl",
                        "--image-root", scenes / "images", "--output-dir", tmp_path / "out", f"init={tmp_path / 'start'}",
                        "train.max_minutes=0.1", "data.max_length=400", "train.log_every=1000")
    assert "until 0.1 minutes of training" in proc.stdout + proc.stderr
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in log if "loss" in e]
    assert len(steps) == 1 and steps[0] > 1  # logged once, at the last step, though log_every was never reached
    assert any("eval_loss" in e for e in log)
    config = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert config["train"]["lr"] == 2e-4 and config["train"]["schedule"] == "minutes"
    load_model(str(tmp_path / "out"))
    # the recipe replays the default model's own data and checks its skills before and after
    assert "samples of default data mixed in" in proc.stdout + proc.stderr
    skills = json.loads((tmp_path / "out" / "skills.json").read_text())
    assert set(skills["before"]) == set(skills["after"]) == {"scenes (held out)", "easy-VQA test", "text questions"}
    assert "the starting model's skills" in proc.stdout + proc.stderr
    noise = ("Warning", "warn(", "Failed to load", "Loading weights", "Traceback")
    assert not [line for line in (proc.stdout + proc.stderr).splitlines() if any(word in line for word in noise)]


def test_the_progress_bar_never_passes_the_time_budget():
    """A run's last step lands past its budget: the bar stops at the budget instead of failing to draw (it ended
    runs at their last step, before the final save)."""
    from finetune.config import TrainSettings
    from finetune.schedule import TrainingClock
    from finetune.trainer import advance, training_progress

    t = TrainSettings(max_minutes=0.01, schedule="minutes")
    clock = TrainingClock(already=5.0)  # 5 s into a 0.6 s budget
    progress = training_progress(t, 10**12, 0, TrainingClock(), disable=False)
    advance(progress, t, clock)
    str(progress)  # what tqdm draws
    assert progress.n == progress.total
    progress.close()


def test_replay_of_a_file_is_mixed_in_at_its_share_and_skills_are_reported(tiny_llm_dir, tmp_path, scenes):
    """data.replay=FILE: a held-out slice of it measures the starting model before and after; the rest joins the
    training samples at data.replay_share; a missing replay file is refused before any model loads."""
    recipe = tiny_recipe(tmp_path, tiny_llm_dir, scenes, max_steps=2, eval_every=0)
    proc = run_finetune("--config", recipe, f"data.replay={scenes / 'test.jsonl'}",
                        f"data.replay_image_root={scenes / 'images'}", "data.replay_share=0.5")
    n_train = sum(1 for _ in open(scenes / "train.jsonl"))
    mixed = re.search(r"replay: (\d+) samples of test.jsonl data mixed in \(50% of the training tokens",
                      proc.stdout + proc.stderr)
    assert mixed and n_train / 2 <= int(mixed.group(1)) <= n_train * 2, proc.stdout + proc.stderr  # alike samples
    skills = json.loads((tmp_path / "out" / "skills.json").read_text())
    assert list(skills["before"]) == list(skills["after"]) == ["held-out test.jsonl"]
    assert skills["before"]["held-out test.jsonl"]["loss"] > 0
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert any("skills_after" in e for e in log)
    missing = run_finetune("--config", recipe, "data.replay=nowhere.jsonl", check=False)
    assert missing.returncode == 2 and "data.replay = 'nowhere.jsonl': no such file" in missing.stderr


def test_replay_share_counts_tokens_not_samples():
    """Long replay samples (scene conversations) next to short new ones: the share is of the tokens trained on."""
    from finetune.replay import ReplayData, mix

    new = [f"new-{i}" for i in range(100)]  # 10 tokens each: 1,000 tokens
    replay = ReplayData("old", [f"old-{i}" for i in range(30)], [None] * 30)  # 50 tokens each
    length = {**{s: 10 for s in new}, **{s: 50 for s in replay.samples}}.__getitem__
    samples, roots, n = mix(new, [None] * 100, replay, 0.2, seed=0, length=length)
    assert n == 5 and len(samples) == len(roots) == 105  # 250 of 1,250 tokens: 20%, where 25 samples would be 56%
    assert len(set(samples[100:])) == 5 and all(s.startswith("old-") for s in samples[100:])
    samples, _, n = mix(new, [None] * 100, replay, 0.75, seed=0, length=length)
    assert n == 60 and len(set(samples[100:130])) == 30  # twice the pool (3,000 tokens): all once before repeats
    assert mix(new, [None] * 100, replay, 0.0, seed=0, length=length)[2] == 0


def test_config_values_are_typed_by_the_recipe_fields(tmp_path):
    """YAML reads 1e-4 as a string: it is still a number for train.lr; a wrong type or an unknown key names the
    key, the value and what was expected, before any model loads."""
    from finetune.config import load_config

    (tmp_path / "r.yaml").write_text("train:\n  lr: 1e-4\n  max_steps: 10.0\n")
    cfg = load_config(str(tmp_path / "r.yaml"), ["data.train=x.jsonl", "train.projector_lr=3e-4", "lora.r=8"])
    assert cfg.train.lr == 1e-4 and cfg.train.projector_lr == 3e-4 and cfg.train.max_steps == 10 and cfg.lora.r == 8
    assert isinstance(cfg.train.max_steps, int)
    assert load_config(None, ["data.train=x", "train.mixed_precision=no"]).train.mixed_precision == "no"  # not False
    with pytest.raises(ValueError, match=r"train.lr = 'fast', but it must be a number"):
        load_config(str(tmp_path / "r.yaml"), ["train.lr=fast"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) train.learning_rate"):
        load_config(None, ["train.learning_rate=1e-4"])
    proc = run_finetune("--config", tmp_path / "r.yaml", "--data", "x.jsonl", "train.batch_size=four", check=False)
    assert proc.returncode != 0 and "train.batch_size = 'four', but it must be a whole number" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_config_is_a_clear_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("stage: instruct\ntrain: {lr: 1e-4, bogus: 1}\ndata: {train: x.jsonl}\n")
    proc = run_finetune("--config", tmp_path / "bad.yaml", check=False)
    assert proc.returncode == 2 and "unknown key(s) train.bogus" in proc.stderr
    proc = run_finetune("--config", tmp_path / "missing.yaml", check=False)
    assert proc.returncode == 2 and "config file not found" in proc.stderr


def trained_weights(out: Path) -> dict:
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    weights.update({f"projector.{k}": v for k, v in load_file(str(out / "projector.safetensors")).items()})
    return weights


def test_kill_and_resume_ends_with_the_same_weights(tiny_llm_dir, tmp_path, scenes):
    steps = dict(max_steps=40, save_every=4, eval_every=0)
    straight = tmp_path / "straight"
    straight.mkdir()
    run_finetune("--config", tiny_recipe(straight, tiny_llm_dir, scenes, **steps))
    killed = tmp_path / "killed"
    killed.mkdir()
    recipe = tiny_recipe(killed, tiny_llm_dir, scenes, **steps)
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "--config", str(recipe)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "out" / "checkpoints" / "step-0000008").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "out" / "vlm_config.json").exists(), "killed mid-run: no final model yet"
    run_finetune("--config", recipe, "--resume")
    a, b = trained_weights(straight / "out"), trained_weights(killed / "out")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    # the log holds each step once (the rows written after the checkpoint the kill returned to are gone)
    logged = [json.loads(line)["step"] for line in (killed / "out" / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert logged == sorted(set(logged)) and logged[-1] == 40


def test_a_run_bounded_by_minutes_anneals_to_zero(tiny_llm_dir, tmp_path, scenes):
    recipe = tiny_recipe(tmp_path, tiny_llm_dir, scenes, max_steps=0, epochs=1000, max_minutes=0.15,
                         schedule="minutes", save_every=10**6, eval_every=0)
    run_finetune("--config", recipe)
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    lrs = [e["lr"] for e in log if "lr" in e]
    assert len(lrs) > 3 and max(lrs) > 0.5e-3  # it warmed up to about the peak of 1e-3 ...
    assert lrs[-1] < 0.1e-3  # ... and annealed by the time the budget ran out
    state = json.loads(next((tmp_path / "out" / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["train_seconds"] >= 0.15 * 60


def test_dataloader_workers_train_exactly_like_the_main_process(tiny_llm_dir, tmp_path, scenes):
    outs = []
    for workers in (0, 2):
        run_dir = tmp_path / f"workers{workers}"
        run_dir.mkdir()
        run_finetune("--config", tiny_recipe(run_dir, tiny_llm_dir, scenes, max_steps=5, eval_every=0),
                     f"data.num_workers={workers}")
        outs.append(trained_weights(run_dir / "out"))
    worst = max((outs[0][k] - outs[1][k]).abs().max().item() for k in outs[0])
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("schedule", ["steps", "minutes"])
def test_two_processes_with_accelerate_launch(tiny_llm_dir, tmp_path, scenes, schedule):
    # "minutes": the main process's clock is broadcast each step (finetune/schedule.py), a collective
    # that must work with gloo too
    recipe = tiny_recipe(tmp_path, tiny_llm_dir, scenes, max_steps=3, save_every=3, eval_every=0, schedule=schedule,
                         max_minutes=10 if schedule == "minutes" else 0)
    # The shipped DDP config; on this CPU-only machine it runs two gloo processes.
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
                           "--mixed_precision", "no", "-m", "finetune", "--config", str(recipe)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(2 process(es), " in proc.stdout + proc.stderr
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert (tmp_path / "out" / "checkpoints" / "step-0000003" / "rng-1.safetensors").is_file()
    from assistant.weights.loading import load_model

    load_model(str(tmp_path / "out"))
