"""The SD scripts' invisible DWT-DCT watermark: recovered after a PNG round trip, skipped on small images.

DWT-DCT decodes reliably from textured images (measured: uniform noise 512x512 decodes the 136-bit SD 1
payload exactly) but poorly from smooth ones (gradients and flat shapes: ~65-80% of bits), so the tests use noise.
"""

import importlib.util

import numpy as np
import pytest
from PIL import Image

from sd_jax import watermark
from sd_jax.images import save_pngs
from sd_jax.watermark import (
    PAYLOAD_SD1,
    PAYLOAD_SD2,
    WatermarkUnavailableError,
    add_watermark,
    read_watermark,
    watermark_fits,
)


def _available() -> bool:
    # Not pytest.importorskip("imwatermark"): without torch that import fails even when the package is installed.
    try:
        watermark.check_available()
    except WatermarkUnavailableError:
        return False
    return True


needs_imwatermark = pytest.mark.skipif(not _available(), reason="invisible-watermark is not installed")


def _noise(size: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@needs_imwatermark
@pytest.mark.parametrize("payload, size", [(PAYLOAD_SD1, 512), (PAYLOAD_SD2, 256)])
def test_payload_survives_png_round_trip(tmp_path, payload, size):
    image = _noise(size)
    (path,) = save_pngs([image], tmp_path, [0], watermark=payload)
    with Image.open(path) as saved:
        assert read_watermark(saved, len(payload)) == payload
        assert saved.mode == "RGB"
        assert not np.array_equal(np.asarray(saved), np.asarray(image))
    assert read_watermark(image, len(payload)) != payload


def test_small_images_are_unchanged():
    for size in [(255, 512), (512, 200), (64, 64)]:
        image = Image.new("RGB", size, (10, 20, 30))
        assert not watermark_fits(image)
        assert add_watermark(image, PAYLOAD_SD1) is image
    assert watermark_fits(Image.new("RGB", (256, 256)))
    with pytest.raises(ValueError, match="too small"):
        read_watermark(Image.new("RGB", (128, 128)), 4)


def test_missing_package_is_a_one_line_error(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "imwatermark" else find_spec(name)
    )
    with pytest.raises(ImportError, match=r"^invisible-watermark is not installed: pip install --no-deps") as e:
        add_watermark(_noise(256), PAYLOAD_SD2)
    assert "\n" not in str(e.value)
