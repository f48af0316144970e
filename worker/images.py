"""Images to model inputs: decode with Pillow, match the model's channels, layout and size, scale.

The model's first input says what it wants: rank 4 is [N, C, H, W] when dim 1 is a channel count
and [N, H, W, C] when the last dim is (1 and 3 are read before 4), rank 3 the same without N, rank 2
is [H, W] gray when both are fixed sizes (a dynamic first dim is a batch of feature rows, as iris's
[N, 4]: no image). Any other input refuses images with a BadInput that names what it takes.
Pixels become float32 in [0, 1], then (x - mean) / std when the model's sidecar JSON sets
{"image": {"mean": [...], "std": [...]}}. Dynamic H or W keep the image's own size.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from broker.errors import BadInput, PayloadTooLarge, UnsupportedMediaType

from .sessions import TensorSpec

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _layout(spec: TensorSpec) -> tuple[str, int | None, int | None, int]:
    """(layout, H, W, channels) for an image input; raises BadInput for inputs that are no image.

    Gray or RGB channel counts (1, 3) win over 4 on either side: [1, 4, 4, 3] is a 4x4 RGB image.
    """
    shape = spec.shape
    if len(shape) == 4:
        n, a, b, c = shape
        if a in (1, 3):
            return "NCHW", b, c, a
        if c in (1, 3, 4):
            return "NHWC", a, b, c
        if a == 4 or a is None:
            return "NCHW", b, c, a or 3
        if c is None:
            return "NHWC", a, b, 3
    if len(shape) == 3:
        a, b, c = shape
        if a in (1, 3):
            return "CHW", b, c, a
        if c in (1, 3, 4):
            return "HWC", a, b, c
        if a == 4:
            return "CHW", b, c, a
    if len(shape) == 2 and None not in shape and min(shape) > 1:
        return "HW", shape[0], shape[1], 1
    raise BadInput(f"input {spec.name!r} of shape {list(shape)} does not take an image")


def check_image_model(model: str, spec: TensorSpec) -> None:
    """Refuse an image for a model whose input is no image, naming the input it does take."""
    try:
        _layout(spec)
    except BadInput:
        dims = ", ".join("N" if d is None else str(d) for d in spec.shape)
        dtype = spec.dtype.name if spec.dtype is not None else spec.type
        rows = (f"rows of {spec.shape[1]} numbers, e.g. {{\"values\": [{', '.join(['1'] * spec.shape[1])}]}}"
                if len(spec.shape) == 2 and spec.shape[1] and spec.shape[1] <= 16 else '{"values": [...]}')
        raise BadInput(f"{model} does not take images: its input {spec.name!r} is [{dims}] ({dtype}); "
                       f"send JSON {rows}") from None


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode an image, refusing bombs before their pixels are allocated."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise PayloadTooLarge(f"image is {image.width}x{image.height} pixels; "
                                      f"the limit is {max_pixels} pixels")
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise UnsupportedMediaType("not an image format the server reads (JPEG, PNG, BMP, GIF, "
                                       "TIFF, WebP, ...)") from None
        raise PayloadTooLarge(f"image over the pixel limit of {max_pixels}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadInput(f"the image could not be decoded: {exc}") from None
    return image


def to_tensor(image: Image.Image, spec: TensorSpec, options: dict) -> np.ndarray:
    layout, height, width, channels = _layout(spec)
    if channels not in _MODES:
        raise BadInput(f"input {spec.name!r} wants {channels} channels; images have 1, 3 or 4")
    image = image.convert(_MODES[channels])
    size = (width or image.width, height or image.height)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    if "mean" in options or "std" in options:
        mean = np.asarray(options.get("mean", 0.0), np.float32)
        std = np.asarray(options.get("std", 1.0), np.float32)
        pixels = (pixels - mean) / std
    if layout in ("NCHW", "CHW"):
        pixels = pixels.transpose(2, 0, 1)
    elif layout == "HW":
        pixels = pixels[:, :, 0]
    if layout.startswith("N"):
        pixels = pixels[np.newaxis]
    dtype = spec.dtype if spec.dtype is not None and spec.dtype.kind == "f" else np.dtype(np.float32)
    return np.ascontiguousarray(pixels, dtype=dtype)
