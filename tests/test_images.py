"""Every broken or unusual image a user can upload: a clear ImageError or a correct RGB image."""

import io

import numpy as np
import pytest
from PIL import Image

from assistant.inputs.images import ImageError, load_image


def encode(image, fmt="PNG", **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_refused_inputs_say_why(tmp_path):
    png = encode(Image.new("RGB", (64, 64), "red"))
    cases = {
        b"": "empty",
        b"this is not an image at all": "not an image",
        png[: len(png) // 2]: "corrupt or truncated",
    }
    for data, message in cases.items():
        with pytest.raises(ImageError, match=message):
            load_image(data, where="upload 1")
    with pytest.raises(ImageError, match="upload 1: image file is empty"):
        load_image(b"", where="upload 1")
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="over the"):
        load_image(png, max_bytes=100)
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(encode(Image.new("RGB", (3000, 10))))


def test_decompression_bomb_is_refused_before_decoding():
    # A 1-bit PNG of 20000 x 20000 pixels is tiny on disk and 400 Mpx in memory.
    bomb = encode(Image.new("1", (20000, 20000)), optimize=True)
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb)


def test_modes_become_upright_rgb():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red -> white
    assert load_image(encode(rgba)).getpixel((5, 5)) == (255, 255, 255)
    half = Image.new("RGBA", (10, 10), (0, 0, 0, 255))
    assert load_image(encode(half)).getpixel((5, 5)) == (0, 0, 0)
    palette = Image.new("P", (10, 10))
    palette.putpalette([0, 0, 255] * 256)
    assert load_image(encode(palette)).getpixel((1, 1)) == (0, 0, 255)
    cmyk = Image.new("CMYK", (10, 10), (0, 255, 255, 0))  # red in CMYK
    r, g, b = load_image(encode(cmyk, "JPEG")).getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60
    sixteen = Image.fromarray(np.full((10, 10), 40000, dtype=np.uint16).astype(np.int32), mode="I")
    sixteen.putpixel((0, 0), 0)
    out = load_image(encode(sixteen))
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 0)


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (40, 20), "green")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = load_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    r, g, b = load_image(buf.getvalue()).getpixel((4, 4))
    assert r > 200 and b < 50
