"""SmoothQuant factors in the int8 path: exact in real arithmetic, and they rescue a layer whose input
has an outlier channel."""

import torch

from assistant.quantization import SmoothedInt8Linear, _dynamic_int8, linear_input_ranges


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
