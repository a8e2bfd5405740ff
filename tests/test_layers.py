"""The convolution that runs small CPU convolutions as one matrix product equals XLA's convolution."""

import jax
import numpy as np
import pytest
from flax import nnx

from sd_jax.modules import layers


@pytest.mark.parametrize(
    "size, kernel, stride, pad, cin, cout",
    [
        (4, 3, 1, 1, 24, 16),  # the U-Net's deepest level
        (8, 3, 1, 1, 8, 12),  # the U-Net's 8x8 level
        (10, 3, 1, 1, 8, 8),  # 100 output pixels: the largest that takes the product
        (16, 3, 2, 1, 8, 8),  # a downsampler to 8x8
        (5, 3, 2, 1, 8, 8),  # odd size, stride 2
        (6, 3, 1, 0, 8, 8),  # no padding
        (32, 1, 1, 0, 16, 8),  # 1x1 at any size
        (11, 3, 1, 1, 8, 8),  # 121 output pixels: XLA's convolution
    ],
)
def test_convolution_equals_xla(monkeypatch, size, kernel, stride, pad, cin, cout):
    monkeypatch.setattr(layers, "MATMUL_MIN_CHANNELS", 8)  # small channel counts, to keep the test fast
    rng = np.random.default_rng(size * kernel + stride)
    x = rng.standard_normal((2, size, size, cin)).astype(np.float32)
    k = rng.standard_normal((kernel, kernel, cin, cout)).astype(np.float32) / (kernel * kernel * cin) ** 0.5
    args = ((stride, stride), ((pad, pad), (pad, pad)))
    dims = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    want = np.asarray(jax.lax.conv_general_dilated(x, k, *args, dimension_numbers=dims))
    got = np.asarray(jax.jit(lambda x, k: layers.convolution(x, k, *args, dimension_numbers=dims))(x, k))
    assert got.shape == want.shape
    # The same products summed in another order: float32 rounding, ~1e-7 of the output scale.
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_small_wide_convolutions_become_a_matrix_product():
    """The path taken is visible in the program: a dot for small outputs of wide inputs, a convolution otherwise."""

    def hlo(size, channels):
        x, k = np.zeros((2, size, size, channels), np.float32), np.zeros((3, 3, channels, 8), np.float32)
        dims = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
        fn = jax.jit(lambda x, k: layers.convolution(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims))
        return fn.lower(x, k).as_text()

    assert "dot_general" in hlo(8, 256) and "convolution" not in hlo(8, 256)
    assert "convolution" in hlo(16, 256) and "dot_general" not in hlo(16, 256)
    assert "convolution" in hlo(8, 128) and "dot_general" not in hlo(8, 128)


@pytest.mark.parametrize("size, channels", [(4, (16, 16)), (12, (8, 24)), (1, (8, 8)), (16, (8, 8))])
def test_upsampler_by_parity_equals_upsampling_then_convolving(monkeypatch, size, channels):
    """The four 2x2 convolutions of the input equal nearest 2x upsampling followed by the 3x3 convolution."""
    monkeypatch.setattr(layers, "MATMUL_MIN_CHANNELS", 8)
    monkeypatch.setattr(layers, "PARITY_MIN_PIXELS", 1)
    up = layers.Upsample2D(*channels, rngs=nnx.Rngs(size))
    up.conv.bias[...] = jax.random.normal(jax.random.key(size), (channels[1],))
    x = np.random.default_rng(size).standard_normal((2, size, size + 3, channels[0])).astype(np.float32)
    want = np.asarray(jax.jit(lambda x: up.conv(layers.upsample_nearest(x)))(x))
    got = np.asarray(jax.jit(up)(x))
    assert got.shape == (2, 2 * size, 2 * (size + 3), channels[1])
    # Kernel taps summed before multiplying: float32 rounding of the sums, ~1e-7 of the output scale.
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
