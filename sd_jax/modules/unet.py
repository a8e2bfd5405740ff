"""The Stable Diffusion conditional U-Net (SD 1.x / 2.x, including the 9-channel inpainting variant), NHWC.

Attribute names follow `diffusers.UNet2DConditionModel`, so every diffusers state-dict key maps 1:1 onto a
parameter path here (see `sd_jax.convert.params.state_from_torch`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sd_jax.modules.attention import Transformer2DModel
from sd_jax.modules.layers import (
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    conv2d,
    timestep_embedding,
)

_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers config keys whose only supported value is the one given (anything else is a feature we lack).
_UNET_FIXED = {
    "act_fn": "silu",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "time_cond_proj_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
# diffusers config keys that do not change inference.
_UNET_IGNORED = ("dropout", "addition_embed_type_num_heads")


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


def config_kwargs(
    cls: type, d: Mapping[str, Any], *, fixed: Mapping[str, Any], ignored: tuple[str, ...], model: str
) -> dict[str, Any]:
    """The dataclass kwargs of a diffusers config dict; raises ValueError on unsupported features or unknown keys.

    Args:
      cls: the config dataclass; its field names are taken from `d`.
      d: a diffusers `config.json` dict.
      fixed: keys we accept only at one value (lists of that value count, e.g. only_cross_attention [False, ...]).
      ignored: keys with no effect on inference.
      model: named in errors.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs, problems = {}, []
    for key, value in d.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in names:
            kwargs[key] = _tuplify(value)
        elif key in fixed:
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(v != fixed[key] for v in values):
                problems.append(f"{key}={value!r} (only {fixed[key]!r} is supported)")
        else:
            problems.append(f"unknown config key {key}={value!r}")
    if problems:
        raise ValueError(f"{model} config not supported: " + "; ".join(problems))
    return kwargs


def _per_block(value: int | tuple[int, ...], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} blocks")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a `UNet2DConditionModel`; defaults are Stable Diffusion 1.5.

    `attention_head_dim` follows diffusers' historical misnaming: unless `num_attention_heads` is set it is the
    NUMBER of heads per block (SD 1.x: 8; SD 2.x: (5, 10, 20, 20), i.e. 64-wide heads); the head width is
    block channels // heads.
    """

    sample_size: int | None = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    cross_attention_dim: int = 768
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    transformer_layers_per_block: int | tuple[int, ...] = 1
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNetConfig: {n} block_out_channels need as many down and up block types")
        for t in self.down_block_types:
            if t not in _DOWN_BLOCKS:
                raise ValueError(f"UNetConfig: unsupported down block type {t!r} (supported: {_DOWN_BLOCKS})")
        for t in self.up_block_types:
            if t not in _UP_BLOCKS:
                raise ValueError(f"UNetConfig: unsupported up block type {t!r} (supported: {_UP_BLOCKS})")
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError("UNetConfig: only one cross_attention_dim for all blocks is supported")
        for heads, channels in zip(self.heads, self.block_out_channels, strict=True):
            if channels % heads:
                raise ValueError(f"UNetConfig: {channels} channels do not split into {heads} heads")
        _per_block(self.layers_per_block, n, "layers_per_block")
        _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per block (diffusers: num_attention_heads or, if unset, attention_head_dim)."""
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return _per_block(heads, len(self.block_out_channels), "attention heads")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        """From a diffusers `UNet2DConditionModel` config dict; raises ValueError for unsupported features."""
        return cls(**config_kwargs(cls, d, fixed=_UNET_FIXED, ignored=_UNET_IGNORED, model="UNet2DConditionModel"))

    def to_dict(self) -> dict[str, Any]:
        """Kwargs for `diffusers.UNet2DConditionModel(**cfg.to_dict())` building the same network."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        # diffusers refuses num_attention_heads and reads the head count from attention_head_dim instead.
        d["attention_head_dim"] = d.pop("num_attention_heads") or self.attention_head_dim
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return d | {"act_fn": "silu", "mid_block_type": "UNetMidBlock2DCrossAttn"}


class UNetDownBlock(nnx.Module):
    """A diffusers CrossAttnDownBlock2D (with `attentions`) or DownBlock2D (without)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        temb_channels: int,
        cross_attention: dict | None,
        add_downsample: bool,
        groups: int,
        eps: float,
        downsample_padding: int,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels=temb_channels,
                    groups=groups,
                    eps=eps,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        self.attentions = (
            nnx.List(
                [
                    Transformer2DModel(out_channels, groups=groups, dtype=dtype, rngs=rngs, **cross_attention)
                    for _ in range(num_layers)
                ]
            )
            if cross_attention is not None
            else None
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=downsample_padding, dtype=dtype, rngs=rngs)])
            if add_downsample
            else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """x: (B, H, W, C_in) -> (output, the skip activations for the up path, in order)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetUpBlock(nnx.Module):
    """A diffusers CrossAttnUpBlock2D (with `attentions`) or UpBlock2D (without); each resnet eats one skip."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        temb_channels: int,
        cross_attention: dict | None,
        add_upsample: bool,
        groups: int,
        eps: float,
        dtype,
        rngs: nnx.Rngs,
    ):
        resnets = []
        for i in range(num_layers):
            # The last resnet's skip comes from the previous (shallower) level of the down path.
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channels if i == 0 else out_channels
            resnets.append(
                ResnetBlock2D(
                    resnet_in + skip_channels,
                    out_channels,
                    temb_channels=temb_channels,
                    groups=groups,
                    eps=eps,
                    dtype=dtype,
                    rngs=rngs,
                )
            )
        self.resnets = nnx.List(resnets)
        self.attentions = (
            nnx.List(
                [
                    Transformer2DModel(out_channels, groups=groups, dtype=dtype, rngs=rngs, **cross_attention)
                    for _ in range(num_layers)
                ]
            )
            if cross_attention is not None
            else None
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None

    def __call__(
        self,
        x: jax.Array,
        skips: list[jax.Array],
        temb: jax.Array,
        context: jax.Array,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        """x: (B, H, W, C); skips: this block's skip activations, consumed last-first -> (B, H', W', C_out)."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips[-1 - i]], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet -> transformer -> resnet at the lowest resolution."""

    def __init__(
        self,
        channels: int,
        *,
        temb_channels: int,
        cross_attention: dict,
        groups: int,
        eps: float,
        output_scale_factor: float,
        dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(temb_channels=temb_channels, groups=groups, eps=eps, output_scale_factor=output_scale_factor)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, dtype=dtype, rngs=rngs, **kw) for _ in range(2)])
        self.attentions = nnx.List(
            [Transformer2DModel(channels, groups=groups, dtype=dtype, rngs=rngs, **cross_attention)]
        )

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nnx.Module):
    """Text-conditioned noise (or v) predictor: `model(sample, timesteps, encoder_hidden_states)`.

    Args:
      config: the architecture.
      dtype: parameter and compute dtype (norms and softmax still run in float32 inside).
      rngs: initialisers' randomness (use `nnx.eval_shape` to build without allocating, then load a checkpoint).
    """

    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        c = config
        n = len(c.block_out_channels)
        layers = _per_block(c.layers_per_block, n, "layers_per_block")
        tlayers = _per_block(c.transformer_layers_per_block, n, "transformer_layers_per_block")
        heads = c.heads
        time_embed_dim = c.block_out_channels[0] * 4
        groups, eps = c.norm_num_groups, c.norm_eps

        def cross_attention(i: int, channels: int) -> dict:
            return dict(
                heads=heads[i],
                dim_head=channels // heads[i],
                cross_attention_dim=c.cross_attention_dim,
                num_layers=tlayers[i],
                use_linear_projection=c.use_linear_projection,
                upcast_attention=c.upcast_attention,
            )

        self.conv_in = conv2d(c.in_channels, c.block_out_channels[0], 3, dtype=dtype, rngs=rngs)
        self.time_embedding = TimestepEmbedding(c.block_out_channels[0], time_embed_dim, dtype=dtype, rngs=rngs)

        down = []
        out_ch = c.block_out_channels[0]
        for i, block_type in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, c.block_out_channels[i]
            down.append(
                UNetDownBlock(
                    in_ch,
                    out_ch,
                    num_layers=layers[i],
                    temb_channels=time_embed_dim,
                    cross_attention=cross_attention(i, out_ch) if block_type == "CrossAttnDownBlock2D" else None,
                    add_downsample=i < n - 1,
                    groups=groups,
                    eps=eps,
                    downsample_padding=c.downsample_padding,
                    dtype=dtype,
                    rngs=rngs,
                )
            )
        self.down_blocks = nnx.List(down)

        self.mid_block = UNetMidBlock2DCrossAttn(
            c.block_out_channels[-1],
            temb_channels=time_embed_dim,
            cross_attention=cross_attention(n - 1, c.block_out_channels[-1]),
            groups=groups,
            eps=eps,
            output_scale_factor=c.mid_block_scale_factor,
            dtype=dtype,
            rngs=rngs,
        )

        up = []
        rev = c.block_out_channels[::-1]
        out_ch = rev[0]
        for i, block_type in enumerate(c.up_block_types):
            j = n - 1 - i  # the down level this up block mirrors
            prev_ch, out_ch, in_ch = out_ch, rev[i], rev[min(i + 1, n - 1)]
            up.append(
                UNetUpBlock(
                    in_ch,
                    prev_ch,
                    out_ch,
                    num_layers=layers[j] + 1,
                    temb_channels=time_embed_dim,
                    cross_attention=cross_attention(j, out_ch) if block_type == "CrossAttnUpBlock2D" else None,
                    add_upsample=i < n - 1,
                    groups=groups,
                    eps=eps,
                    dtype=dtype,
                    rngs=rngs,
                )
            )
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = GroupNorm(c.block_out_channels[0], groups, eps=eps, dtype=dtype, rngs=rngs)
        self.conv_out = conv2d(c.block_out_channels[0], c.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        encoder_attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Predicts noise (or v) for noisy latents.

        Args:
          sample: (B, H, W, in_channels) noisy latents, NHWC.
          timesteps: (B,) or scalar, in the training schedule's units (0..999), any real dtype.
          encoder_hidden_states: (B, L, cross_attention_dim) text embeddings.
          encoder_attention_mask: optional (B, L) bool, False for padding tokens that cross-attention must
            ignore (prompts padded to a bucketed length).

        Returns:
          (B, H, W, out_channels) in the dtype of `sample`.
        """
        c = self.config
        out_dtype = sample.dtype
        b, h, w, _ = sample.shape
        x = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        if encoder_attention_mask is not None:
            # Only cross-attention looks inside: every block passes the context through unchanged.
            context = (context, encoder_attention_mask)
        if c.center_input_sample:
            x = 2 * x - 1
        t = jnp.broadcast_to(jnp.asarray(timesteps).astype(jnp.float32).reshape(-1), (b,))
        t_emb = timestep_embedding(
            t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos, downscale_freq_shift=c.freq_shift
        )
        temb = self.time_embedding(t_emb.astype(self.dtype))

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)

        x = self.mid_block(x, temb, context)

        # Sizes that do not halve evenly all the way down need explicit upsampling targets (the skip shapes).
        factor = 2 ** (len(self.up_blocks) - 1)
        odd_size = h % factor != 0 or w % factor != 0
        for block in self.up_blocks:
            n_skips = len(block.resnets)
            block_skips, skips = skips[-n_skips:], skips[:-n_skips]
            upsample_size = tuple(skips[-1].shape[1:3]) if (odd_size and skips) else None
            x = block(x, block_skips, temb, context, upsample_size)

        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        return x.astype(out_dtype)
