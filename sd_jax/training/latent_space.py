"""A from-scratch VAE's latent space, standardized per channel by folding an affine map into its 1x1 convolutions.

An autoencoder trained with a small KL weight puts its latents wherever reconstruction likes them: each channel
has its own offset and spread, and the offsets can dwarf the spreads. A single `scaling_factor` (1 / std over every
element, as SD's 0.18215 was set) then leaves the content of each channel with a small variance next to the
diffusion noise, so the sampler's last steps start from a much lower signal-to-noise ratio than the schedule
intends and fine detail (a shape's outline) is lost. Standardizing each channel fixes that without touching what
the VAE computes: the encoder's `quant_conv` is rescaled to emit (mean - shift) / scale and the decoder's
`post_quant_conv` to take it back, so decode(encode(x)) is unchanged and the model stays a standard SD-layout VAE
(`scaling_factor` 1, no shift) that diffusers and the original loaders read as they are.
"""

from __future__ import annotations

import numpy as np


def channel_stats(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of latents (..., C)."""
    flat = np.asarray(latents, np.float64).reshape(-1, latents.shape[-1])
    return flat.mean(axis=0), flat.std(axis=0)


def standardize_vae(flat: dict[str, np.ndarray], shift: np.ndarray, scale: np.ndarray) -> dict[str, np.ndarray]:
    """A VAE's flat parameters with latents z' = (z - shift) / scale in place of z.

    flat: `{"quant_conv.kernel": (1, 1, 2C, 2C), "quant_conv.bias": (2C,), "post_quant_conv.kernel": (1, 1, C, C),
    "post_quant_conv.bias": (C,), ...}`; quant_conv's outputs are (mean, logvar) along the channel axis. The mean
    becomes (mean - shift) / scale, the log-variance drops by 2 log(scale) (the posterior's spread scales with it),
    and post_quant_conv applied to z' computes what it computed on z = scale * z' + shift.
    """
    for name in ("quant_conv.kernel", "quant_conv.bias", "post_quant_conv.kernel", "post_quant_conv.bias"):
        if name not in flat:
            raise ValueError(f"the VAE has no {name}: its latent space cannot be standardized in place")
    shift = np.asarray(shift, np.float64)
    scale = np.asarray(scale, np.float64)
    channels = flat["post_quant_conv.bias"].shape[0]
    if shift.shape != (channels,) or scale.shape != (channels,) or not np.all(scale > 0):
        raise ValueError(f"shift and scale must be ({channels},) with positive scales")
    out = dict(flat)
    kernel = np.asarray(flat["quant_conv.kernel"], np.float64).copy()  # (1, 1, in, out)
    bias = np.asarray(flat["quant_conv.bias"], np.float64).copy()
    kernel[..., :channels] /= scale
    bias[:channels] = (bias[:channels] - shift) / scale
    bias[channels:] -= 2.0 * np.log(scale)
    out["quant_conv.kernel"], out["quant_conv.bias"] = kernel, bias

    kernel = np.asarray(flat["post_quant_conv.kernel"], np.float64)  # (1, 1, in=C, out=C)
    bias = np.asarray(flat["post_quant_conv.bias"], np.float64)
    out["post_quant_conv.bias"] = bias + shift @ kernel[0, 0]
    out["post_quant_conv.kernel"] = kernel * scale[:, None]
    dtypes = {k: np.asarray(v).dtype for k, v in flat.items()}
    return {k: np.asarray(v, dtypes[k]) for k, v in out.items()}
