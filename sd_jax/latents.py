"""Pixels to the U-Net's latents and back: the VAE's encoder mean and decoder, tiled for large images.

Latents here are "as the U-Net sees them": (mean - shift_factor) * scaling_factor of the VAE's encoder
distribution; `decode` takes raw VAE latents (the compiled program unscales its output itself).

SD's VAE decoder is known to overflow in float16 (more often at high resolutions): a float16 codec whose decoded
images are not all finite decodes again in float32, and logs that it did.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sd_jax import compile_cache, editing, tiling
from sd_jax.modules.vae import AutoencoderKL

log = logging.getLogger("sd_jax")


def _encode_mean(graphdef, state, images):
    return nnx.merge(graphdef, state).encode(images)[0]


def _decode(graphdef, state, latents):
    return nnx.merge(graphdef, state).decode(latents)


class LatentCodec:
    """A VAE (NHWC), with its weights in `state`, as the pipeline's encoder and tiled decoder."""

    def __init__(self, graphdef, config, dtype, factor: int):
        """Args: config: the VAE's config (scaling_factor, shift_factor); factor: pixels per latent along a side."""
        self.config = config
        self.dtype = dtype
        self.factor = factor
        self.state = None
        self.encode_mean = compile_cache.shared_jit(_encode_mean, graphdef)  # (state, (B, H, W, 3)) -> mean
        self.decode_raw = compile_cache.shared_jit(_decode, graphdef)  # (state, raw latents) -> [-1, 1] pixels

    @property
    def state(self):
        """The VAE's weights (an nnx.State)."""
        return self._state

    @state.setter
    def state(self, state) -> None:
        self._state = state
        self._float32 = None  # (float32 weights, float32 decoder), made from `state` when a float16 decode overflows

    def encode_image(self, image: np.ndarray, tile: bool | None = None) -> np.ndarray:
        """Latents (h, w, C) of an image (H, W, 3) uint8 (the distribution's mean: deterministic). Images over a
        megapixel are encoded in overlapping tiles (`sd_jax.tiling`) unless `tile` says otherwise."""
        return self.encode(editing.to_model_range(np.asarray(image)), tile)

    def encode(self, pixels: np.ndarray, tile: bool | None = None) -> np.ndarray:
        """`encode_image` of a model-range image (H, W, 3) in [-1, 1]."""
        pixels = np.asarray(pixels, np.float32)[None]
        state = self.state
        if tile if tile is not None else tiling.needs_tiling(*pixels.shape[1:3]):
            mean = tiling.tiled_encode(
                lambda x: self.encode_mean(state, jnp.asarray(x, self.dtype)), pixels, factor=self.factor
            )
        else:
            mean = self.encode_mean(state, jnp.asarray(pixels, self.dtype))
        mean = np.asarray(mean, np.float32)[0]
        return (mean - float(self.config.shift_factor or 0.0)) * float(self.config.scaling_factor)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Images (B, H, W, 3) in [0, 1] from raw VAE latents (B, h, w, C), decoded in overlapping tiles; in float32
        when a float16 decode overflows."""
        state = self.state
        images = tiling.tiled_decode(
            lambda z: self.decode_raw(state, jnp.asarray(z, self.dtype)), latents, factor=self.factor
        )
        if jnp.dtype(self.dtype) == jnp.float16 and not np.isfinite(images).all():
            state32, decode32 = self._float32_decoder()
            images = tiling.tiled_decode(
                lambda z: decode32(state32, jnp.asarray(z, jnp.float32)), latents, factor=self.factor
            )
            log.warning("VAE decode overflowed in float16; decoded in float32")
        return np.clip(np.asarray(images, np.float32) / 2.0 + 0.5, 0.0, 1.0)

    def _float32_decoder(self):
        """(weights, decoder) computing in float32: the weights cast once, kept until `state` is replaced."""
        if self._float32 is None:
            # A float16 graph would cast the weights back: the layers compute in the dtype they were built with.
            model = nnx.eval_shape(lambda: AutoencoderKL(self.config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
            state32 = jax.tree.map(lambda x: x.astype(jnp.float32), self.state)
            self._float32 = (state32, jax.jit(functools.partial(_decode, nnx.graphdef(model))))
        return self._float32
