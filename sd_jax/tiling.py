"""Tiled VAE encode and decode: large images through the VAE one overlapping tile at a time, NHWC.

The VAE's memory grows with the image (and its mid-block attention with the square of the latent area), so a
2048x2048 image does not fit where a 512x512 one does. Here the input is cut into overlapping tiles of one fixed
shape (one compilation), each tile goes through a jitted function, and the outputs are blended on the host with
feathering weights (a linear ramp across each overlap), so the device only ever holds one tile.

Tiled output is close to, not equal to, untiled output: the VAE's GroupNorm takes statistics over its whole input,
and a tile sees only its own pixels. Inputs that fit in one tile go through the function once, unchanged.

This module knows nothing about the model: it gets `decode_fn` / `encode_fn`, e.g.

    decode = jax.jit(lambda state, z: nnx.merge(graph, state).decode(z))
    images = tiled_decode(functools.partial(decode, state), latents, tile=64, overlap=16, factor=8)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of equal tiles covering [0, size), neighbours overlapping by at least `overlap`.

    One tile (start 0, of length `size`) when size <= tile. Otherwise the fewest tiles of length `tile` that cover
    the range with that overlap, spread evenly from 0 to size - tile: the last ends exactly at `size`, so no tile
    needs padding and all have one shape.
    """
    if size < 1 or tile < 1:
        raise ValueError(f"tile_starts: size and tile must be positive, got size={size}, tile={tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"tile_starts: overlap must be in [0, tile={tile}), got {overlap}")
    if size <= tile:
        return [0]
    stride = tile - overlap
    count = -(-(size - overlap) // stride)  # ceil: count * tile - (count - 1) * overlap >= size
    # Consecutive floors of i * (size - tile) / (count - 1) differ by at most ceil of that step, which is <= stride.
    return [i * (size - tile) // (count - 1) for i in range(count)]


def _ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """(length,) float32 window: 1 inside, rising over the first / falling over the last `overlap` entries."""
    window = np.ones(length, np.float32)
    if overlap == 0:
        return window
    # Midpoint samples: a rising and a falling ramp over the same `overlap` entries sum to exactly 1, and no weight
    # is 0, so every pixel keeps a positive total weight.
    rise = np.minimum((np.arange(length, dtype=np.float32) + 0.5) / overlap, 1.0)
    if ramp_start:
        window = np.minimum(window, rise)
    if ramp_end:
        window = np.minimum(window, rise[::-1])
    return window


def blend_weights(
    tile_h: int, tile_w: int, overlap: int, at_top: bool, at_bottom: bool, at_left: bool, at_right: bool
) -> np.ndarray:
    """Feathering window of one tile, (tile_h, tile_w) float32, every entry in (0, 1].

    Sides that touch another tile ramp linearly from ~0 to 1 over `overlap` pixels; sides at the image border
    (`at_top` etc.) stay 1. Tiled outputs are summed with these weights, then divided by the summed weights.
    """
    rows = _ramp(tile_h, overlap, not at_top, not at_bottom)
    cols = _ramp(tile_w, overlap, not at_left, not at_right)
    return rows[:, None] * cols[None, :]


def _tiled_apply(
    fn: Callable, x: np.ndarray, grid_hw: tuple[int, int], tile: int, overlap: int, in_scale: int, out_scale: int
) -> np.ndarray:
    """Applies `fn` tile by tile over a grid and blends the outputs on the host.

    Tiles are laid out on a grid of grid_hw cells (tile and overlap in cells); a cell is in_scale x in_scale input
    pixels and out_scale x out_scale output pixels.

    Args:
      fn: (B, th * in_scale, tw * in_scale, C_in) -> (B, th * out_scale, tw * out_scale, C_out), th and tw being
        min(grid height, tile) and min(grid width, tile).
      x: (B, grid_h * in_scale, grid_w * in_scale, C_in) on the host.

    Returns:
      (B, grid_h * out_scale, grid_w * out_scale, C_out) float32.
    """
    (gh, gw), b = grid_hw, x.shape[0]
    ys, xs = tile_starts(gh, tile, overlap), tile_starts(gw, tile, overlap)
    th, tw = min(gh, tile), min(gw, tile)
    out = weights = None
    for y in ys:
        for x0 in xs:
            part = x[:, y * in_scale : (y + th) * in_scale, x0 * in_scale : (x0 + tw) * in_scale]
            result = np.asarray(fn(part), np.float32)
            expected = (b, th * out_scale, tw * out_scale)
            if result.ndim != 4 or result.shape[:3] != expected:
                raise ValueError(f"tile function returned shape {result.shape}, expected {expected + ('C',)}")
            if out is None:
                out = np.zeros((b, gh * out_scale, gw * out_scale, result.shape[-1]), np.float32)
                weights = np.zeros((gh * out_scale, gw * out_scale), np.float32)
            w = blend_weights(
                th * out_scale, tw * out_scale, overlap * out_scale, y == 0, y + th == gh, x0 == 0, x0 + tw == gw
            )
            rows = slice(y * out_scale, (y + th) * out_scale)
            cols = slice(x0 * out_scale, (x0 + tw) * out_scale)
            out[:, rows, cols] += result * w[None, :, :, None]
            weights[rows, cols] += w
    return out / weights[None, :, :, None]


def tiled_decode(decode_fn: Callable, latents, *, tile: int = 64, overlap: int = 16, factor: int = 8) -> np.ndarray:
    """Decodes latents tile by tile and blends the images in pixel space.

    Args:
      decode_fn: a jitted decoder of one tile, (B, th, tw, C) -> (B, th * factor, tw * factor, 3), where th, tw are
        min(h, tile), min(w, tile): the same shape for every tile, so it compiles once.
      latents: (B, h, w, C), a JAX or NumPy array (raw VAE latents, as the decoder takes them).
      tile, overlap: tile side and minimum overlap between neighbours, in latent pixels.
      factor: the VAE's upsampling factor, 2 ** (len(block_out_channels) - 1).

    Returns:
      (B, h * factor, w * factor, 3) float32 NumPy array. When the latents fit in one tile this is
      `decode_fn(latents)` exactly.
    """
    latents = np.asarray(latents)
    if latents.ndim != 4:
        raise ValueError(f"tiled_decode: latents must be (B, h, w, C), got shape {latents.shape}")
    return _tiled_apply(decode_fn, latents, latents.shape[1:3], tile, overlap, in_scale=1, out_scale=factor)


def tiled_encode(encode_fn: Callable, images, *, tile: int = 512, overlap: int = 64, factor: int = 8) -> np.ndarray:
    """Encodes images tile by tile and blends the latents in latent space.

    Args:
      encode_fn: a jitted encoder of one tile, (B, th, tw, 3) -> (B, th / factor, tw / factor, C), e.g. the mean of
        `AutoencoderKL.encode`; th, tw are min(H, tile), min(W, tile), the same for every tile.
      images: (B, H, W, 3) in [-1, 1], a JAX or NumPy array; H and W multiples of `factor`.
      tile, overlap: tile side and minimum overlap between neighbours, in pixels, multiples of `factor`.
      factor: the VAE's downsampling factor.

    Returns:
      (B, H / factor, W / factor, C) float32 NumPy array; `encode_fn(images)` exactly when they fit in one tile.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"tiled_encode: images must be (B, H, W, 3), got shape {images.shape}")
    h, w = images.shape[1:3]
    if h % factor or w % factor or tile % factor or overlap % factor:
        raise ValueError(
            f"tiled_encode: image size {h}x{w}, tile {tile} and overlap {overlap} must be multiples of {factor}"
        )
    grid = (h // factor, w // factor)
    return _tiled_apply(encode_fn, images, grid, tile // factor, overlap // factor, in_scale=factor, out_scale=1)


def needs_tiling(height: int, width: int, max_pixels: int = 1024 * 1024) -> bool:
    """Whether an image of height x width pixels should go through the VAE tiled (more than max_pixels)."""
    return height * width > max_pixels
