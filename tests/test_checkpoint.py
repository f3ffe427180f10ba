"""Save / reload gives identical logits; loading refuses pickle."""

import pytest
import torch
from helpers import image_question, random_image, tiny_config
from peft import LoraConfig, get_peft_model

from assistant.model.builder import build_model
from assistant.weights.checkpoint import load_checkpoint, save_checkpoint
from assistant.weights.loading import ModelSpecError, load_model


def logits(model, processor):
    batch = processor([image_question()], [[random_image(5)]])
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "qformer"])
def test_save_reload_identical_logits(tiny_llm_dir, tmp_path, projector):
    torch.manual_seed(1)
    model, processor = build_model(tiny_config(tiny_llm_dir, projector))
    model.eval()
    before = logits(model, processor)
    save_checkpoint(model, processor, tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["chat_template.jinja", "preprocessor_config.json", "projector.safetensors",
                     "vision_tower.safetensors", "vlm_config.json"]
    reloaded, processor2 = load_model(str(tmp_path / "ckpt"))
    assert torch.equal(before, logits(reloaded, processor2))


def test_lora_adapter_save_reload_identical_logits(tiny_llm_dir, tmp_path):
    torch.manual_seed(2)
    model, processor = build_model(tiny_config(tiny_llm_dir))
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # LoRA B starts at zero: make the adapter matter
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    before = logits(model, processor)
    save_checkpoint(model, processor, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "ckpt" / "llm").exists()
    reloaded, processor2 = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(before, logits(reloaded, processor2))
    # without the adapter the answers differ: the adapter was really applied
    base, _ = build_model(tiny_config(tiny_llm_dir))
    base.vision_tower.load_state_dict(model.vision_tower.state_dict())
    base.projector.load_state_dict(model.projector.state_dict())
    assert not torch.allclose(before, logits(base.eval(), processor2), atol=1e-4)


def test_checkpoint_with_pickle_is_refused(tiny_llm_dir, tmp_path):
    model, processor = build_model(tiny_config(tiny_llm_dir))
    save_checkpoint(model, processor, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "evil.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        load_model(str(tmp_path / "ckpt"))


def test_bad_specs_say_what_is_wrong(tmp_path):
    with pytest.raises(ModelSpecError, match="no such directory"):
        load_model("./does-not-exist")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ModelSpecError, match="is a file"):
        load_model(str(tmp_path / "x.txt"))
    with pytest.raises(ModelSpecError, match="neither"):
        load_model(str(tmp_path))
    with pytest.raises(ModelSpecError, match="hub"):
        load_model("nobody/no-such-model-here")  # offline: a clear error, not a traceback
