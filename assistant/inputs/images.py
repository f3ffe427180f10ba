"""Robust image loading: every way a user can hand us an image, and every way it can be broken.

All entry points (chat upload, API, VQA questions file, training data) go through `load_image`,
so they all answer bad input the same way: an `ImageError` whose message says what is wrong.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Refuse decompression bombs: PIL raises DecompressionBombError above 2x this many pixels and warns
# above it; we turn the warning into an error too (89 Mpx is far beyond any useful input here).
MAX_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
# An image narrower than this on its short side, relative to its long side, is refused: the
# model resizes to a square and such an image would carry no information.
MAX_ASPECT_RATIO = 50.0


class ImageError(ValueError):
    """An image could not be used; the message says why (and where, when the caller knows)."""


def load_image(source, *, max_bytes: int = DEFAULT_MAX_BYTES, where: str = "") -> Image.Image:
    """Open `source` (path, bytes, file object or PIL image) as an RGB image.

    Handles: EXIF rotation, palette / alpha (composited on white), CMYK, 16-bit and float modes,
    animated images (first frame). Refuses: missing, empty, truncated, corrupt, non-image,
    oversized (bytes), decompression bombs, degenerate sizes.
    """
    prefix = f"{where}: " if where else ""
    if isinstance(source, Image.Image):
        image = source
    else:
        data = _read_bytes(source, max_bytes, prefix)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
            _check_size(image, prefix)  # before decoding: a bomb must not allocate its pixels
            image.load()  # decode now, so truncation and corruption surface here, not later
        except ImageError:
            raise
        except Image.DecompressionBombWarning as e:
            raise ImageError(f"{prefix}image is too large to decode safely ({e})") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"{prefix}image is too large to decode safely ({e})") from None
        except UnidentifiedImageError:
            raise ImageError(f"{prefix}not an image file (unrecognised format)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{prefix}image is corrupt or truncated ({e})") from None
    _check_size(image, prefix)
    try:
        return to_rgb(image)
    except (OSError, ValueError) as e:
        raise ImageError(f"{prefix}image could not be converted to RGB ({e})") from None


def _check_size(image: Image.Image, prefix: str) -> None:
    w, h = image.size
    if w < 1 or h < 1:
        raise ImageError(f"{prefix}image has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ImageError(f"{prefix}image is too large ({w}x{h} pixels; limit {MAX_PIXELS})")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ImageError(f"{prefix}image aspect ratio {w}x{h} is too extreme (limit {MAX_ASPECT_RATIO:.0f}:1)")


def _read_bytes(source, max_bytes: int, prefix: str) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{prefix}image file not found: {path}")
        if not path.is_file():
            raise ImageError(f"{prefix}not a file: {path}")
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageError(f"{prefix}image file is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB limit")
        data = path.read_bytes()
    elif hasattr(source, "read"):
        data = source.read(max_bytes + 1)
    else:
        raise ImageError(f"{prefix}cannot read an image from {type(source).__name__}")
    if len(data) == 0:
        raise ImageError(f"{prefix}image file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"{prefix}image is over the {max_bytes / 1e6:.1f} MB limit")
    return data


def to_rgb(image: Image.Image) -> Image.Image:
    """Normalise any PIL image to an upright 8-bit RGB image."""
    if getattr(image, "is_animated", False):
        image.seek(0)  # animated GIF/WebP/PNG: the first frame
        image = image.copy()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit greyscale: scale the real range to 0..255 instead of clipping to white.
        import numpy as np

        a = np.asarray(image, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        image = Image.fromarray(a.astype("uint8"), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        rgba = image.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode != "RGB":
        image = image.convert("RGB")  # CMYK, L, 1, YCbCr, LAB ...
    return image


# Truncated files must fail loudly, not be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
