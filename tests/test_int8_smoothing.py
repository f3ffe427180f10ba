"""The CPU int8 path's layers: SmoothQuant factors rescue a layer whose input has an outlier channel;
prompt rows can go through bf16 (close to fp32) or, without fast bf16, fp32, while decode rows keep their
fp32 or int8 path."""

import pytest
import torch

from assistant.cpu import int8 as quantization
from assistant.cpu import policy
from assistant.cpu.int8 import Bf16PromptLinear, Fp32PromptLinear, SmoothedInt8Linear, _dynamic_int8, linear_input_ranges
from assistant.cpu.policy import bf16_matmul_is_fast


def test_smoothing_with_outlier_channels_beats_plain_dynamic_int8():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    x = torch.randn(64, 256)
    x[:, 3] *= 80  # an outlier channel, as LLM activations have
    x[:, 77] *= 40
    ranges = linear_input_ranges(torch.nn.Sequential(linear), lambda: linear(x))
    assert set(ranges) == {"0"} and torch.allclose(ranges["0"], x.abs().amax(0))
    reference = linear(x)
    smoothed = SmoothedInt8Linear(linear, ranges["0"])(x)
    plain_copy = torch.nn.Linear(256, 128)
    plain_copy.load_state_dict(linear.state_dict())
    plain = _dynamic_int8(plain_copy)(x)

    def error(y):
        return ((y - reference).norm() / reference.norm()).item()

    assert error(smoothed) < 0.5 * error(plain), (error(smoothed), error(plain))
    assert error(smoothed) < 0.03


def test_bf16_prompt_rows_stay_close_and_few_rows_take_the_other_path():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48)
    x_short, x_long = torch.randn(1, 3, 96), torch.randn(1, 200, 96)
    ranges = linear_input_ranges(torch.nn.Sequential(linear), lambda: linear(torch.cat([x_short, x_long], 1)))
    int8 = SmoothedInt8Linear(linear, ranges["0"])
    with torch.no_grad():
        for few_rows in (linear, int8):  # the fp32 layer itself (decode steps exact) or its int8 version
            layer = Bf16PromptLinear(linear, few_rows, min_rows=128)
            assert torch.equal(layer(x_short), few_rows(x_short))
            out, reference = layer(x_long), linear(x_long)
            assert out.dtype == torch.float32 and not torch.equal(out, few_rows(x_long))
            assert ((out - reference).norm() / reference.norm()).item() < 0.01  # bf16: ~3 digits
    # the MLP's gate/up keep their bf16 output for the down projection, which takes bf16 rows through bf16
    gate_up = Bf16PromptLinear(linear, int8, min_rows=128, bf16_output=True)
    down = Bf16PromptLinear(torch.nn.Linear(48, 96), torch.nn.Linear(48, 96), min_rows=128)
    with torch.no_grad():
        assert gate_up(x_long).dtype == torch.bfloat16 and gate_up(x_short).dtype == torch.float32
        assert down(gate_up(x_long)).dtype == torch.float32
        few = gate_up(x_short[:, :2]).bfloat16()  # two bf16 rows: below min_rows, still the bf16 path
        assert torch.equal(down(few), torch.nn.functional.linear(few, down.weight_bf16, down.bias_bf16).float())
    assert isinstance(bf16_matmul_is_fast(), bool)


def test_without_fast_bf16_prompt_rows_keep_fp32_and_decode_rows_int8(monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48)
    x_short, x_long = torch.randn(1, 3, 96), torch.randn(1, 40, 96)
    int8 = SmoothedInt8Linear(linear, x_long.abs().amax((0, 1)))
    layer = Fp32PromptLinear(linear, int8, min_rows=17)
    with torch.no_grad():
        assert torch.equal(layer(x_long), linear(x_long))  # prompts exact
        assert torch.equal(layer(x_short), int8(x_short)) and not torch.equal(layer(x_short), linear(x_short))
    # quantize_int8 wraps the smoothed layers so where bf16 is slow; the MLP output projection stays fp32
    monkeypatch.setattr(quantization, "bf16_matmul_is_fast", lambda: False)
    block = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(96, 96), "down_proj": torch.nn.Linear(96, 96)})
    block.get_output_embeddings = lambda: None
    quantization.quantize_int8(block, {"q_proj": x_long.abs().amax((0, 1))})
    assert type(block["q_proj"]) is Fp32PromptLinear and type(block["q_proj"].few_rows) is SmoothedInt8Linear
    assert block["q_proj"].min_rows == policy.PROMPT_ROWS_FP32_FROM > 16  # batch VQA's 16-row steps: int8
    assert type(block["down_proj"]) is torch.nn.Linear


def test_bf16_speed_on_x86_follows_the_cpu_flags_not_a_timing(monkeypatch):
    """A timing taken while the test suite loaded the CPU said "slow" on this AMX machine, and the
    compiled decode steps and bf16 prompt rows were left off: on x86 the instructions decide."""
    import platform

    from assistant.cpu import policy

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(policy, "bf16_timing_says_fast", lambda *a, **k: pytest.fail("timed on x86"))
    try:
        for amx, avx512_bf16, expected in [(True, False, True), (False, True, True), (False, False, False)]:
            monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
            monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
            bf16_matmul_is_fast.cache_clear()
            assert bf16_matmul_is_fast() is expected
        monkeypatch.setattr(platform, "machine", lambda: "aarch64")  # no such flags there: a timing decides
        monkeypatch.setattr(policy, "bf16_timing_says_fast", lambda *a, **k: True)
        bf16_matmul_is_fast.cache_clear()
        assert bf16_matmul_is_fast() is True
    finally:
        bf16_matmul_is_fast.cache_clear()
