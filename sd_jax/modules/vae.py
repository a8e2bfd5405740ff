"""The Stable Diffusion KL autoencoder (`AutoencoderKL`), NHWC: images <-> latent Gaussian parameters.

Attribute names follow `diffusers.AutoencoderKL`, so every diffusers state-dict key maps 1:1 onto a parameter path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sd_jax.modules.attention import SpatialSelfAttention
from sd_jax.modules.layers import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv2d
from sd_jax.modules.unet import config_kwargs

_VAE_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
_VAE_EPS = 1e-6  # diffusers hard-codes this for every VAE norm


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of an `AutoencoderKL`; defaults are the Stable Diffusion 1.x/2.x VAE.

    scaling_factor / shift_factor are not used by the network: the pipeline maps latents as
    (z - shift_factor) * scaling_factor after encoding and back before `decode`.
    force_upcast: a hint that this VAE overflows in float16 (run it in float32).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"VAEConfig: {n} block_out_channels need as many down and up block types")
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
            raise ValueError(f"VAEConfig: only DownEncoderBlock2D is supported, got {self.down_block_types}")
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
            raise ValueError(f"VAEConfig: only UpDecoderBlock2D is supported, got {self.up_block_types}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VAEConfig:
        """From a diffusers `AutoencoderKL` config dict; raises ValueError for unsupported features."""
        return cls(**config_kwargs(cls, d, fixed=_VAE_FIXED, ignored=(), model="AutoencoderKL"))

    def to_dict(self) -> dict[str, Any]:
        """Kwargs for `diffusers.AutoencoderKL(**cfg.to_dict())` building the same network."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return d | {"act_fn": "silu"}


class VAEMidBlock(nnx.Module):
    """resnet -> (single-head spatial self-attention) -> resnet, no timestep embedding."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool, dtype, rngs: nnx.Rngs):
        kw = dict(temb_channels=None, groups=groups, eps=_VAE_EPS, dtype=dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, **kw) for _ in range(2)])
        self.attentions = (
            nnx.List([SpatialSelfAttention(channels, groups=groups, eps=_VAE_EPS, dtype=dtype, rngs=rngs)])
            if add_attention
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


def _resnets(in_channels: int, out_channels: int, num_layers: int, *, groups: int, dtype, rngs) -> nnx.List:
    """A VAE block's resnets (no time embedding): the first maps in_channels to out_channels."""
    return nnx.List(
        [
            ResnetBlock2D(
                in_channels if i == 0 else out_channels,
                out_channels,
                temb_channels=None,
                groups=groups,
                eps=_VAE_EPS,
                dtype=dtype,
                rngs=rngs,
            )
            for i in range(num_layers)
        ]
    )


class EncoderBlock(nnx.Module):
    """diffusers DownEncoderBlock2D: resnets, then a stride-2 conv with bottom/right padding."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        add_downsample: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.resnets = _resnets(in_channels, out_channels, num_layers, groups=groups, dtype=dtype, rngs=rngs)
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=0, dtype=dtype, rngs=rngs)]) if add_downsample else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C_in) -> (B, H/2, W/2, C_out) (no halving in the last block)."""
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class DecoderBlock(nnx.Module):
    """diffusers UpDecoderBlock2D: resnets, then nearest 2x upsampling and a conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        add_upsample: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.resnets = _resnets(in_channels, out_channels, num_layers, groups=groups, dtype=dtype, rngs=rngs)
        self.upsamplers = nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C_in) -> (B, 2H, 2W, C_out) (no doubling in the last block)."""
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    """Image -> concatenated (mean, logvar) of the latent Gaussian, before quant_conv."""

    def __init__(self, c: VAEConfig, *, dtype, rngs: nnx.Rngs):
        ch, groups, n = c.block_out_channels, c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = conv2d(c.in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List(
            [
                EncoderBlock(
                    ch[max(i - 1, 0)],
                    ch[i],
                    num_layers=c.layers_per_block,
                    groups=groups,
                    add_downsample=i < n - 1,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(n)
            ]
        )
        self.mid_block = VAEMidBlock(
            ch[-1], groups=groups, add_attention=c.mid_block_add_attention, dtype=dtype, rngs=rngs
        )
        self.conv_norm_out = GroupNorm(ch[-1], groups, eps=_VAE_EPS, dtype=dtype, rngs=rngs)
        self.conv_out = conv2d(ch[-1], 2 * c.latent_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels), f = 2 ** (levels - 1)."""
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents -> image."""

    def __init__(self, c: VAEConfig, *, dtype, rngs: nnx.Rngs):
        rev, groups, n = c.block_out_channels[::-1], c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = conv2d(c.latent_channels, rev[0], 3, dtype=dtype, rngs=rngs)
        self.mid_block = VAEMidBlock(
            rev[0], groups=groups, add_attention=c.mid_block_add_attention, dtype=dtype, rngs=rngs
        )
        self.up_blocks = nnx.List(
            [
                DecoderBlock(
                    rev[max(i - 1, 0)],
                    rev[i],
                    num_layers=c.layers_per_block + 1,
                    groups=groups,
                    add_upsample=i < n - 1,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(n)
            ]
        )
        self.conv_norm_out = GroupNorm(rev[-1], groups, eps=_VAE_EPS, dtype=dtype, rngs=rngs)
        self.conv_out = conv2d(rev[-1], c.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        """z: (B, h, w, latent_channels) -> (B, h*f, w*f, out_channels)."""
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The KL-regularised VAE: `encode(x) -> (mean, logvar)`, `decode(z) -> x`.

    Args:
      config: the architecture.
      dtype: parameter and compute dtype (norms and softmax still run in float32 inside).
      rngs: initialisers' randomness (use `nnx.eval_shape` to build without allocating, then load a checkpoint).
    """

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        lc = config.latent_channels
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)
        self.quant_conv = conv2d(2 * lc, 2 * lc, 1, dtype=dtype, rngs=rngs) if config.use_quant_conv else None
        self.post_quant_conv = conv2d(lc, lc, 1, dtype=dtype, rngs=rngs) if config.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image to latent Gaussian parameters.

        Args:
          x: (B, H, W, in_channels) in [-1, 1].

        Returns:
          mean, logvar: each (B, H/f, W/f, latent_channels) in the dtype of `x`; logvar clipped to [-30, 20].
          Latents for the U-Net are (mean + exp(logvar / 2) * noise - shift_factor) * scaling_factor.
        """
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(x.dtype), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels), in z's dtype, ~[-1, 1]."""
        h = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            h = self.post_quant_conv(h)
        return self.decoder(h).astype(z.dtype)
