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


def classifier_free_guidance(unet: UNetFn, context: jnp.ndarray, guidance_scale: jnp.ndarray) -> ModelFn:
    """A guided model `(x_t, t) -> out` over an interleaved [uncond, cond] context (2B, L, D).

    As in diffusers, a guidance scale of 1 or less means no guidance: the conditional prediction alone.
    `guidance_scale` is data (a traced scalar), so changing it does not recompile.
    """

    def model_fn(x_t: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        batch = x_t.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (2 * batch,))
        out = unet(interleave(x_t, x_t), timesteps, context)
        out = out.reshape((batch, 2) + out.shape[1:])
        uncond, cond = out[:, 0], out[:, 1]
        scale = jnp.asarray(guidance_scale, out.dtype)
        return jnp.where(guidance_scale > 1.0, uncond + scale * (cond - uncond), cond)

    return model_fn
