"""The convolution that runs small CPU convolutions as one matrix product equals XLA's convolution."""

import jax
import numpy as np
import pytest

from sd_jax.modules import layers


@pytest.mark.parametrize(
    "size, kernel, stride, pad, cin, cout",
    [
        (4, 3, 1, 1, 24, 16),  # the U-Net's deepest level
        (8, 3, 1, 1, 8, 12),  # 64 output pixels: the largest that takes the product
        (16, 3, 2, 1, 8, 8),  # a downsampler to 8x8
        (5, 3, 2, 1, 8, 8),  # odd size, stride 2
        (6, 3, 1, 0, 8, 8),  # no padding
        (32, 1, 1, 0, 16, 8),  # 1x1 at any size
        (16, 3, 1, 1, 8, 8),  # 256 output pixels: XLA's convolution
    ],
)
def test_convolution_equals_xla(size, kernel, stride, pad, cin, cout):
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


def test_small_convolutions_become_a_matrix_product():
    """The path taken is visible in the compiled program: a dot for small outputs, a convolution otherwise."""
    dims = jax.lax.conv_dimension_numbers((2, 8, 8, 8), (3, 3, 8, 8), ("NHWC", "HWIO", "NHWC"))

    def hlo(size):
        x, k = np.zeros((2, size, size, 8), np.float32), np.zeros((3, 3, 8, 8), np.float32)
        fn = jax.jit(lambda x, k: layers.convolution(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims))
        return fn.lower(x, k).as_text()

    assert "dot_general" in hlo(8) and "convolution" not in hlo(8)
    assert "convolution" in hlo(16) and "dot_general" not in hlo(16)
