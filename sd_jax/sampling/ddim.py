"""DDIM (Song et al. 2020) in k-diffusion form, with eta, as one `lax.fori_loop`.

Twin: diffusers' DDIMScheduler (its schedule is `schedules.ddim_schedule`). A DDIM step is an ancestral step: to
`sigma_down` along the predicted noise, then fresh noise of std `sigma_up` (`schedules.ancestral_step`), with
DDIM's eta deciding the split.
"""

from __future__ import annotations

import jax.numpy as jnp

from sd_jax.sampling import loop, schedules
from sd_jax.sampling.denoisers import Denoiser, change_level
from sd_jax.sampling.loop import DEFAULT_OPTIONS, LatentsState, Sampler, SamplerOptions


def sample_ddim(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    keys: jnp.ndarray | None = None,
    options: SamplerOptions = DEFAULT_OPTIONS,
) -> jnp.ndarray:
    """DDIM from `x` at level sigmas[0] to level sigmas[num_steps], one denoiser call per step.

    Arguments as every sampler's (see `loop`). Noise is drawn only when keys are given (needed when eta > 0).
    Reads options.num_steps, sigmas_next (step i moves to sigmas_next[i], then hands its x_t to sigmas[i + 1]),
    eta, clip_x0, python_loop and after_step.
    """
    sigmas_next = options.next_sigmas(sigmas)
    eta = jnp.asarray(options.eta, jnp.float32)
    clip_x0 = options.clip_x0

    def step(i, state: LatentsState) -> LatentsState:
        sigma, sigma_next = sigmas[i], sigmas_next[i]
        x0 = denoise(state.x, sigma)
        eps = (state.x - x0) / sigma
        if clip_x0 is not None:
            # The twin clamps the predicted x0 but steps with the noise of the unclamped one.
            x0 = jnp.clip(x0, -clip_x0, clip_x0)
        sigma_up, sigma_down = schedules.ancestral_step(sigma, sigma_next, eta)
        x = x0 + sigma_down * eps
        if keys is not None:
            x = x + sigma_up * loop.image_noise(keys, i, x.shape[1:])
        return state.replace(x=change_level(x, sigma_next, sigmas[i + 1]))

    state = LatentsState(x=x.astype(jnp.float32))
    return loop.run_steps(step, state, options.steps(sigmas), options).x


def samplers() -> list[Sampler]:
    """This file's registry entries."""
    return [Sampler("ddim", sample_ddim, schedules.ddim_schedule, 1, "DDIMScheduler", stochastic=True)]
