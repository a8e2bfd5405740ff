"""DDIM (Song et al. 2020) in k-diffusion form, with eta, as one `lax.fori_loop`."""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from sd_jax.sampling.denoisers import Denoiser
from sd_jax.sampling.loop import StepHook, image_noise, run_steps


@struct.dataclass
class DDIMState:
    x: jnp.ndarray  # (B, H, W, C) float32, at level sigmas[i]


def sample_ddim(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    *,
    sigmas_next: jnp.ndarray | None = None,
    num_steps: jnp.ndarray | int | None = None,
    keys: jnp.ndarray | None = None,
    eta: jnp.ndarray | float = 0.0,
    clip_x0: float | None = None,
    python_loop: bool = False,
    after_step: StepHook | None = None,
) -> jnp.ndarray:
    """Samples with DDIM from `x` at level sigmas[0] to level sigmas[num_steps].

    Args:
      denoise: `(x, sigma) -> x0`.
      x: (B, H, W, C) starting latents, already scaled to sigmas[0].
      sigmas: (max_steps + 1,) levels; step i starts at sigmas[i].
      sigmas_next: (max_steps,) the level step i moves to; defaults to sigmas[1:].
      num_steps: steps to take (data: a traced value does not recompile); defaults to len(sigmas) - 1.
      keys: (B,) per-image PRNG keys (`loop.image_noise`). Needed when eta > 0.
      eta: 0 is deterministic DDIM, 1 is DDPM-like ancestral sampling.
      clip_x0: clamp the predicted x0 to [-clip_x0, clip_x0] (the twin's clip_sample), or None.
      python_loop: run a plain Python loop (for debugging) instead of `lax.fori_loop`.
      after_step: `(i, x) -> x` applied after each step (see `loop.run_steps`).

    Returns:
      (B, H, W, C) float32 latents at level sigmas[num_steps].
    """
    if sigmas_next is None:
        sigmas_next = sigmas[1:]
    if num_steps is None:
        num_steps = sigmas.shape[0] - 1
    eta = jnp.asarray(eta, jnp.float32)

    def step(i, state: DDIMState) -> DDIMState:
        sigma, sigma_next = sigmas[i], sigmas_next[i]
        x0 = denoise(state.x, sigma)
        eps = (state.x - x0) / sigma
        if clip_x0 is not None:
            x0 = jnp.clip(x0, -clip_x0, clip_x0)
        # DDIM's posterior std, rewritten in sigmas: std * sqrt(1 + sigma_next^2) of the variance-preserving form.
        noise_scale = eta * sigma_next * jnp.sqrt(jnp.maximum(sigma**2 - sigma_next**2, 0.0)) / sigma
        eps_scale = jnp.sqrt(jnp.maximum(sigma_next**2 - noise_scale**2, 0.0))
        x = x0 + eps_scale * eps
        if keys is not None:
            x = x + noise_scale * image_noise(keys, i, x.shape[1:])
        # The twin hands x_t at level sigma_next to a step that starts at sigmas[i + 1]; usually the same level.
        x = x * (jnp.sqrt(1.0 + sigmas[i + 1] ** 2) / jnp.sqrt(1.0 + sigma_next**2))
        return state.replace(x=x)

    return run_steps(step, DDIMState(x=x.astype(jnp.float32)), num_steps, python_loop, after_step).x
