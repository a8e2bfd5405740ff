"""Classifier-free guidance: one model call on the unconditional and conditional halves, combined."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from sd_jax.sampling.denoisers import ModelFn

UNetFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x_t, t (B,), context) -> out


def interleave(uncond: jnp.ndarray, cond: jnp.ndarray) -> jnp.ndarray:
    """(B, ...) and (B, ...) -> (2B, ...) as [u0, c0, u1, c1, ...].

    Interleaving, rather than concatenating, keeps both halves of an image on the device that holds the image
    when the batch axis is sharded, so guidance needs no communication.
    """
    return jnp.stack([uncond, cond], axis=1).reshape((-1,) + uncond.shape[1:])


def rescale_guidance(guided: jnp.ndarray, cond: jnp.ndarray, guidance_rescale: jnp.ndarray) -> jnp.ndarray:
    """Pulls the guided prediction's per-image standard deviation back toward the conditional one's.

    Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4), as diffusers
    applies it to the model output: std over (H, W, C) with Bessel's correction, mixed by `guidance_rescale`.
    """
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    r = jnp.asarray(guidance_rescale, guided.dtype)
    return r * guided * (std_cond / std_guided) + (1.0 - r) * guided


def classifier_free_guidance(
    unet: UNetFn, context: jnp.ndarray, guidance_scale: jnp.ndarray, guidance_rescale: jnp.ndarray | float = 0.0
) -> ModelFn:
    """A guided model `(x_t, t) -> out` over an interleaved [uncond, cond] context (2B, L, D).

    As in diffusers, a guidance scale of 1 or less means no guidance: the conditional prediction alone, and
    `guidance_rescale` > 0 rescales the guided prediction. Both are data (traced scalars): changing them does
    not recompile.
    """

    def model_fn(x_t: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        batch = x_t.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (2 * batch,))
        out = unet(interleave(x_t, x_t), timesteps, context)
        out = out.reshape((batch, 2) + out.shape[1:])
        uncond, cond = out[:, 0], out[:, 1]
        scale = jnp.asarray(guidance_scale, out.dtype)
        guided = uncond + scale * (cond - uncond)
        guided = jnp.where(guidance_rescale > 0.0, rescale_guidance(guided, cond, guidance_rescale), guided)
        return jnp.where(guidance_scale > 1.0, guided, cond)

    return model_fn
