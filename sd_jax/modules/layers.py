"""Building blocks shared by the U-Net and the VAE: norms, timestep embeddings, resnet blocks, resamplers.

Everything is NHWC. Attribute names follow the diffusers PyTorch modules so checkpoints map 1:1
(see `sd_jax.convert.params`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class GroupNorm(nnx.Module):
    """Group normalisation over the last (channel) axis, computed in float32 and cast back.

    Args:
      num_channels: C, the size of the last axis.
      num_groups: groups; C must divide evenly.
      eps: added to the variance.
    """

    def __init__(self, num_channels: int, num_groups: int, *, eps: float, dtype=jnp.float32, rngs: nnx.Rngs):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_channels,), dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, ..., C) -> (B, ..., C), same dtype."""
        c = x.shape[-1]
        # float32 statistics: bf16/fp16 sums over H*W*C/G elements lose too many bits.
        h = x.astype(jnp.float32).reshape(x.shape[0], -1, self.num_groups, c // self.num_groups)
        mean = jnp.mean(h, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=(1, 3), keepdims=True)
        h = ((h - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        h = h * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return h.astype(x.dtype)


class LayerNorm(nnx.Module):
    """Layer normalisation over the last axis with affine scale and bias, computed in float32."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_features,), dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., D) -> (..., D), same dtype."""
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        h = h * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return h.astype(x.dtype)


# XLA:CPU's direct convolution is slow where images are small and channels many: at the U-Net's 4x4 and 8x8 levels
# a 3x3 2560->1280 convolution took 4x the time of the same multiply-adds as one matrix product, 2x PyTorch's.
# There (outputs of at most this many pixels: 8x8, and the 9x9 of `upsample_conv` at 8x8), and for every 1x1
# convolution, the convolution runs as that product; from 16x16 on XLA's convolution is as fast or faster. Narrow
# convolutions (the tests' tiny models) stay convolutions: there the product gains nothing and compiles slower.
MATMUL_MAX_PIXELS = 100
MATMUL_MIN_CHANNELS = 256
PARITY_MIN_PIXELS = 256  # `Upsample2D` upsamples by parity from 16x16 inputs on


def convolution(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
    **kwargs,
) -> jax.Array:
    """`jax.lax.conv_general_dilated` for NHWC/HWIO, as one matrix product where XLA:CPU's convolution is slow.

    The product multiplies the k*k shifted (strided) views of the padded input, laid side by side on the channel
    axis ("im2col"), by the kernel read as (k*k*C_in, C_out), which is the HWIO kernel's own memory order. It
    adds the same terms as the convolution in another order (float32: ~1e-6 of the largest output). Other
    backends, dilations, groups and larger outputs take the XLA convolution.
    """
    kh, kw, _, _ = rhs.shape
    (sh, sw), ((pt, pb), (pl, pr)) = window_strides, padding
    ho = (lhs.shape[1] + pt + pb - kh) // sh + 1
    wo = (lhs.shape[2] + pl + pr - kw) // sw + 1
    plain = (
        lhs.ndim == 4
        and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
        and feature_group_count == 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
        and kwargs.get("out_sharding") is None
        and kwargs.get("preferred_element_type") is None
    )
    small = kh * kw == 1 or ho * wo <= MATMUL_MAX_PIXELS
    if not (plain and jax.default_backend() == "cpu" and lhs.shape[-1] >= MATMUL_MIN_CHANNELS and small):
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision=precision, **kwargs,
        )  # fmt: skip
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    views = [x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] for i in range(kh) for j in range(kw)]
    columns = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    return jnp.matmul(columns, rhs.reshape(-1, rhs.shape[-1]), precision=precision)


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """An NHWC `nnx.Conv` with PyTorch Conv2d semantics (symmetric integer padding, default 'same' for odd kernels)."""
    pad = (kernel_size - 1) // 2 if padding is None else padding
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=dtype,
        conv_general_dilated=convolution,
        rngs=rngs,
    )


def linear(in_features: int, out_features: int, *, use_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
    """An `nnx.Linear` whose parameters and compute share one dtype."""
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM / diffusers.

    Args:
      timesteps: (B,) any real dtype.
      dim: embedding width; odd widths are zero-padded by one.
      flip_sin_to_cos: order the halves [cos, sin] instead of [sin, cos].
      downscale_freq_shift: frequency i is max_period ** (-i / (dim // 2 - shift)).

    Returns:
      (B, dim) float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :] * scale
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """MLP on the sinusoidal timestep embedding: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear_1 = linear(in_channels, time_embed_dim, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(time_embed_dim, time_embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, in_channels) -> (B, time_embed_dim)."""
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-conv twice, with an optional additive timestep projection and a 1x1 shortcut.

    Args:
      in_channels, out_channels: channel counts; a 1x1 `conv_shortcut` is added when they differ.
      temb_channels: width of the timestep embedding, or None (VAE) for no `time_emb_proj`.
      groups, eps: GroupNorm settings of both norms.
      output_scale_factor: the sum (shortcut + residual) is divided by this.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int = 32,
        eps: float = 1e-6,
        output_scale_factor: float = 1.0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(in_channels, groups, eps=eps, dtype=dtype, rngs=rngs)
        self.conv1 = conv2d(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.time_emb_proj = (
            linear(temb_channels, out_channels, dtype=dtype, rngs=rngs) if temb_channels is not None else None
        )
        self.norm2 = GroupNorm(out_channels, groups, eps=eps, dtype=dtype, rngs=rngs)
        self.conv2 = conv2d(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (
            conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs) if in_channels != out_channels else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """x: (B, H, W, in_channels), temb: (B, temb_channels) or None -> (B, H, W, out_channels)."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("ResnetBlock2D with time_emb_proj needs a timestep embedding")
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / jnp.asarray(self.output_scale_factor, out.dtype)
        return out


class Downsample2D(nnx.Module):
    """Stride-2 3x3 convolution.

    padding=1 pads symmetrically (U-Net); padding=0 pads only bottom/right by one (VAE encoder), as diffusers does,
    so the two layouts give different (not interchangeable) results.
    """

    def __init__(
        self, channels: int, out_channels: int | None = None, *, padding: int = 1, dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.padding = padding
        self.conv = conv2d(channels, out_channels or channels, 3, stride=2, padding=padding, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, ceil-ish H/2, W/2, C_out)."""
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def upsample_nearest(x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour resize of (B, H, W, C): 2x, or to `output_size` with PyTorch 'nearest' indexing."""
    if output_size is None:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    out_h, out_w = output_size
    in_h, in_w = x.shape[1], x.shape[2]
    # torch 'nearest' picks source index floor(dst * in / out), not the half-pixel centre jax.image.resize uses.
    rows = (jnp.arange(out_h) * in_h) // out_h
    cols = (jnp.arange(out_w) * in_w) // out_w
    return x[:, rows][:, :, cols]


def upsample_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling then a 3x3 'same' convolution, computed on x itself by output parity.

    An output pixel of row parity a sees input rows (i-1, i) for a = 0 and (i, i+1) for a = 1, the 3x3 kernel's
    rows summed to two accordingly (k0, k1+k2 or k0+k1, k2); the same for columns. One 2x2 convolution of the
    padded input with the four parities' kernels side by side (4 x C_out outputs) gives every parity; they then
    interleave. 16 multiply-adds per input pixel and channel pair instead of 36, the same sums up to float rounding.

    Args:
      x: (B, H, W, C).
      kernel: (3, 3, C, O), HWIO.
      bias: (O,).

    Returns:
      (B, 2H, 2W, O), in x's dtype.
    """
    b, h, w, _ = x.shape
    o = kernel.shape[-1]

    def two_taps(k3, axis, parity):  # 3 taps along `axis` -> the 2 that pixels of this parity see
        t = [jnp.take(k3, i, axis=axis) for i in range(3)]
        return jnp.stack([t[0], t[1] + t[2]] if parity == 0 else [t[0] + t[1], t[2]], axis=axis)

    k = kernel.astype(jnp.float32)
    parities = [(a, c) for a in (0, 1) for c in (0, 1)]
    k2 = jnp.concatenate([two_taps(two_taps(k, 0, a), 1, c) for a, c in parities], axis=-1).astype(x.dtype)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dims = jax.lax.conv_dimension_numbers(padded.shape, k2.shape, ("NHWC", "HWIO", "NHWC"))
    z = convolution(padded, k2, (1, 1), ((0, 0), (0, 0)), dimension_numbers=dims)  # (B, H+1, W+1, 4*O)
    y = jnp.stack([z[:, a : a + h, c : c + w, n * o : (n + 1) * o] for n, (a, c) in enumerate(parities)], axis=3)
    y = y.reshape(b, h, w, 2, 2, o).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, o)
    return y + bias.astype(x.dtype)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling (or to a given size) followed by a 3x3 convolution."""

    def __init__(self, channels: int, out_channels: int | None = None, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv2d(channels, out_channels or channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        """x: (B, H, W, C) -> (B, 2H, 2W, C_out), or (B, *output_size, C_out)."""
        doubled = output_size is None or tuple(output_size) == (2 * x.shape[1], 2 * x.shape[2])
        # 2.25x fewer multiply-adds (measured on CPU only), for the cost of building the parities' kernels each
        # call: a loss below 16x16 inputs (at 4x4x1280 the kernels cost more than the convolution). Narrow ones
        # (the tests' tiny models) keep the plain form, as for `convolution`.
        big = x.shape[1] * x.shape[2] >= PARITY_MIN_PIXELS and x.shape[-1] >= MATMUL_MIN_CHANNELS
        if doubled and big and jax.default_backend() == "cpu":
            x = x.astype(self.conv.dtype)
            return upsample_conv(x, self.conv.kernel[...], self.conv.bias[...])
        return self.conv(upsample_nearest(x, output_size))
