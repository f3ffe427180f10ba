"""python -m finetune.soup: a weighted average of models fine-tuned from one start, as weight updates."""

import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

from assistant.model.builder import build_model
from assistant.weights.checkpoint import save_checkpoint
from assistant.weights.loading import load_model
from finetune.soup import SoupError, soup
from helpers import tiny_config
from server_fixture import ROOT


def lora_checkpoint(tiny_llm_dir, directory, seed):
    """A tiny model whose vision tower, projector and (non-zero) LoRA adapter depend on `seed`."""
    torch.manual_seed(seed)
    model, processor = build_model(tiny_config(tiny_llm_dir))
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                     init_lora_weights=False))
    save_checkpoint(model, processor, directory)
    return str(directory)


def merged_weights(model) -> dict:
    return {k: v.clone() for k, v in model.llm.merge_and_unload().state_dict().items()}


def logits(model, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        return model.llm(input_ids=ids).logits


@pytest.fixture(scope="module")
def two_models(tiny_llm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("soup")
    return lora_checkpoint(tiny_llm_dir, root / "a", 1), lora_checkpoint(tiny_llm_dir, root / "b", 2)


def test_the_soup_averages_weight_updates_and_the_other_parts(two_models):
    a, b = (load_model(spec)[0] for spec in two_models)
    want_llm = {k: 0.25 * wa + 0.75 * wb for (k, wa), wb in zip(merged_weights(load_model(two_models[0])[0]).items(),
                                                                   merged_weights(load_model(two_models[1])[0]).values())}
    want_projector = {k: 0.25 * v + 0.75 * b.projector.state_dict()[k] for k, v in a.projector.state_dict().items()}
    mixed = soup([a, b], [0.25, 0.75], rank=8)  # two rank-4 updates: their sum has rank 8 at most, so exact
    assert list(mixed.llm.peft_config) == ["default"] and mixed.llm.peft_config["default"].r == 8
    got = merged_weights(mixed)
    assert got.keys() == want_llm.keys()
    for key, value in want_llm.items():
        torch.testing.assert_close(got[key], value, atol=2e-5, rtol=1e-4)
    for key, value in want_projector.items():
        torch.testing.assert_close(mixed.projector.state_dict()[key], value)


def test_a_part_no_model_changed_stays_bit_for_bit(two_models):
    a, b = (load_model(spec)[0] for spec in two_models)
    b.vision_tower.load_state_dict(a.vision_tower.state_dict())
    want = {k: v.clone() for k, v in a.vision_tower.state_dict().items()}
    mixed = soup([a, b], [0.3, 0.7])
    assert all(torch.equal(mixed.vision_tower.state_dict()[k], v) for k, v in want.items())


def test_all_weight_on_one_model_gives_that_model(two_models):
    a, b = (load_model(spec)[0] for spec in two_models)
    want = logits(load_model(two_models[1])[0])
    torch.testing.assert_close(logits(soup([a, b], [0.0, 1.0])), want, atol=1e-4, rtol=1e-4)


def test_models_from_other_llms_are_refused(two_models, tiny_llm_dir_gentle, tmp_path):
    other = load_model(lora_checkpoint(tiny_llm_dir_gentle, tmp_path / "other", 3))[0]
    with pytest.raises(SoupError, match="same LLM"):
        soup([load_model(two_models[0])[0], other], [0.5, 0.5])


def test_the_command_writes_a_model_and_answers_bad_input(two_models, tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "finetune.soup", *map(str, args)], cwd=ROOT,
                                       capture_output=True, text=True, timeout=300)
    proc = run(*two_models, "--weights", 0.5, 0.5, "--output-dir", tmp_path / "soup")
    assert proc.returncode == 0, proc.stderr
    assert f"averaged model written to {tmp_path / 'soup'}" in proc.stdout and not proc.stderr.strip(), proc.stderr
    assert load_model(str(tmp_path / "soup"))[0].llm.peft_config["default"].r == 4
    proc = run(*two_models, "--weights", 0.5, "--output-dir", tmp_path / "bad")
    assert proc.returncode == 2 and "one weight each (got 2 models, 1 weights)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "bad").exists()
    proc = run(two_models[0], tmp_path / "nowhere", "--weights", 0.5, 0.5, "--output-dir", tmp_path / "bad")
    assert proc.returncode == 2 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr
