"""The invisible watermark of the original Stable Diffusion scripts (DWT-DCT, `invisible-watermark` package).

The scripts convert the RGB image to OpenCV's BGR layout, embed the payload bytes with
`WatermarkEncoder().set_watermark("bytes", payload)` and `encoder.encode(bgr, "dwtDct")`, and convert back.
`read_watermark` runs the matching decoder. Only the DWT-DCT method is used: it needs numpy, PyWavelets and
OpenCV, never torch.

Install without its torch requirement: `pip install --no-deps invisible-watermark`.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
from PIL import Image

PAYLOAD_SD1 = b"StableDiffusionV1"  # the SD 1 scripts' payload, 136 bits
PAYLOAD_SD2 = b"SDV2"  # the SD 2 scripts' payload, 32 bits
PAYLOADS = {"sd1": PAYLOAD_SD1, "sd2": PAYLOAD_SD2}  # by `ModelConfig.family`
MIN_SIZE = 256  # the package refuses images under 256*256 pixels; diffusers skips widths under 256
METHOD = "dwtDct"

_NOT_INSTALLED = (
    "invisible-watermark is not installed: pip install --no-deps invisible-watermark (or turn the watermark off)"
)


class WatermarkUnavailableError(ImportError):
    """The `invisible-watermark` package (module `imwatermark`) or one of its DWT-DCT dependencies is missing."""


def _rivagan_placeholder() -> types.ModuleType:
    """A stand-in for `imwatermark.rivaGan`, whose `RivaWatermark` raises when used."""

    class RivaWatermark:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("the RivaGAN watermark needs torch; sd_jax uses only the DWT-DCT watermark")

        @classmethod
        def loadModel(cls):  # the package's method name
            cls()

    module = types.ModuleType("imwatermark.rivaGan")
    module.RivaWatermark = RivaWatermark
    return module


def _imwatermark() -> types.ModuleType:
    """Imports `imwatermark` without torch.

    `imwatermark/__init__.py` imports `rivaGan.py`, which imports torch at import time although only the
    RivaGAN method uses it. When torch is absent, a placeholder module is registered under that name first so
    the import succeeds; the DWT-DCT method used here never touches it.
    """
    if importlib.util.find_spec("imwatermark") is None:
        raise WatermarkUnavailableError(_NOT_INSTALLED)
    if "imwatermark.rivaGan" not in sys.modules and importlib.util.find_spec("torch") is None:
        sys.modules["imwatermark.rivaGan"] = _rivagan_placeholder()
    try:
        import imwatermark
    except ModuleNotFoundError as e:
        raise WatermarkUnavailableError(
            f"invisible-watermark cannot be imported ({e}): pip install PyWavelets opencv-python-headless"
        ) from None
    return imwatermark


def check_available() -> None:
    """Raises `WatermarkUnavailableError` (one line) unless the watermark can be embedded: call before long work."""
    _imwatermark()


def watermark_fits(image: Image.Image) -> bool:
    """Whether `add_watermark` embeds a watermark in `image` (both sides at least 256 pixels)."""
    return min(image.size) >= MIN_SIZE


def _bgr(image: Image.Image) -> np.ndarray:
    """The image as an OpenCV (H, W, 3) uint8 BGR array."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def add_watermark(image: Image.Image, payload: bytes) -> Image.Image:
    """Embeds `payload` as the SD scripts do; returns `image` unchanged when it is too small (`watermark_fits`).

    Returns:
      A new RGB image (alpha, if any, is dropped, as the scripts' RGB conversion does).
    """
    if not watermark_fits(image):
        return image
    encoder = _imwatermark().WatermarkEncoder()
    encoder.set_watermark("bytes", bytes(payload))
    bgr = encoder.encode(_bgr(image), METHOD)
    return Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))


def read_watermark(image: Image.Image, length_bytes: int) -> bytes:
    """Decodes a `length_bytes`-byte DWT-DCT watermark from `image` (whatever is there: garbage if none).

    Raises:
      ValueError: the image is too small to carry a watermark.
    """
    if not watermark_fits(image):
        raise ValueError(f"image {image.size[0]}x{image.size[1]} is too small for a watermark (under {MIN_SIZE})")
    decoder = _imwatermark().WatermarkDecoder("bytes", 8 * length_bytes)
    return decoder.decode(_bgr(image), METHOD)
