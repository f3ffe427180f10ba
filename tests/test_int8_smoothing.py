"""The CPU int8 path's layers: SmoothQuant factors rescue a layer whose input has an outlier channel;
the layers kept out of int8 run prompt rows in bf16 (close) and decode rows in fp32 (exact)."""

import torch

from assistant.quantization import (Bf16PromptLinear, SmoothedInt8Linear, _dynamic_int8, bf16_matmul_is_fast,
                                    linear_input_ranges)


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


def test_bf16_prompt_rows_stay_close_and_decode_rows_stay_exact():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48)
    layer = Bf16PromptLinear(linear)
    one_row, prompt = torch.randn(1, 1, 96), torch.randn(1, 40, 96)
    with torch.no_grad():
        assert torch.equal(layer(one_row), linear(one_row))  # decode steps: the fp32 layer itself
        out = layer(prompt)
        assert out.dtype == torch.float32
        assert ((out - linear(prompt)).norm() / linear(prompt).norm()).item() < 0.01  # bf16: ~3 digits
    assert isinstance(bf16_matmul_is_fast(), bool)


def test_smoothed_layer_runs_long_inputs_in_bf16_and_short_ones_in_int8():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x_short, x_long = torch.randn(3, 64), torch.randn(200, 64)
    ranges = linear_input_ranges(torch.nn.Sequential(linear), lambda: linear(torch.cat([x_short, x_long])))
    with torch.no_grad():
        both = SmoothedInt8Linear(linear, ranges["0"], bf16_min_rows=128)
        int8_only = SmoothedInt8Linear(linear, ranges["0"])
        assert torch.equal(both(x_short), int8_only(x_short))  # few rows: the int8 path
        reference = linear(x_long)
        bf16 = both(x_long)
        assert not torch.equal(bf16, int8_only(x_long))  # many rows: the bf16 path
        assert ((bf16 - reference).norm() / reference.norm()).item() < 0.01
