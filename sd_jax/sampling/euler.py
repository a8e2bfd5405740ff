"""Euler, Euler ancestral and Heun (Karras et al. 2022, Alg. 1-2).

Twins: diffusers' EulerDiscreteScheduler, EulerAncestralDiscreteScheduler and HeunDiscreteScheduler. They step in
k-diffusion's `x = x0 + sigma * eps` through n sigmas spaced over the training timesteps (or Karras / exponential
sigmas between the spaced ends) and a final 0 (`schedules.discrete_schedule`). Heun's twin lists each sigma twice
to take its second evaluation; here the schedule is the plain per-step list and the loop does both evaluations in
one step.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from sd_jax.sampling import loop, schedules
from sd_jax.sampling.denoisers import Denoiser
from sd_jax.sampling.loop import DEFAULT_OPTIONS, LatentsState, Sampler, SamplerOptions
from sd_jax.sampling.schedules import ancestral_step


def euler_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> schedules.Schedule:
    """The schedule of `EulerDiscreteScheduler.from_config(config)`."""
    return schedules.discrete_schedule(config, num_steps, max_steps, schedule_type, euler_options=True)


def euler_a_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> schedules.Schedule:
    """The schedule of `EulerAncestralDiscreteScheduler.from_config(config)`.

    That twin has no Karras or exponential option; those respace as Euler's twin does.
    """
    return schedules.discrete_schedule(config, num_steps, max_steps, schedule_type)


def heun_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> schedules.Schedule:
    """The per-step schedule of `HeunDiscreteScheduler.from_config(config)` (its sigmas without the repeats)."""
    return schedules.discrete_schedule(
        config, num_steps, max_steps, schedule_type, twin_defaults=schedules.SD_BETA_DEFAULTS
    )


def sample_euler(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    keys: jnp.ndarray | None = None,
    options: SamplerOptions = DEFAULT_OPTIONS,
) -> jnp.ndarray:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma, one denoiser call per step.

    Arguments as every sampler's (see `loop`); deterministic (keys are ignored).
    """
    del keys

    def step(i, state: LatentsState) -> LatentsState:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        derivative = (state.x - denoise(state.x, sigma)) / sigma
        return state.replace(x=state.x + derivative * (sigma_next - sigma))

    state = LatentsState(x=x.astype(jnp.float32))
    return loop.run_steps(step, state, options.steps(sigmas), options).x


def sample_euler_a(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    keys: jnp.ndarray | None = None,
    options: SamplerOptions = DEFAULT_OPTIONS,
) -> jnp.ndarray:
    """Euler ancestral: an Euler step to sigma_down, then fresh noise of std sigma_up (`ancestral_step`).

    Arguments as every sampler's (see `loop`); keys are required (step i draws `loop.image_noise(keys, i, ...)`).
    Reads options.eta_ancestral (1 is the twin; 0 is plain Euler) and s_noise (scales the fresh noise).
    """
    loop.require_keys(keys, "euler_a")
    eta = jnp.asarray(options.eta_ancestral, jnp.float32)
    s_noise = jnp.asarray(options.s_noise, jnp.float32)

    def step(i, state: LatentsState) -> LatentsState:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_up, sigma_down = ancestral_step(sigma, sigma_next, eta)
        derivative = (state.x - denoise(state.x, sigma)) / sigma
        x = state.x + derivative * (sigma_down - sigma)
        noise = loop.image_noise(keys, i, x.shape[1:])
        return state.replace(x=x + noise * (s_noise * sigma_up))

    state = LatentsState(x=x.astype(jnp.float32))
    return loop.run_steps(step, state, options.steps(sigmas), options).x


def sample_heun(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    keys: jnp.ndarray | None = None,
    options: SamplerOptions = DEFAULT_OPTIONS,
) -> jnp.ndarray:
    """Heun's second-order method: an Euler step, then the average of the slopes at both ends. The step to
    sigma = 0 is a plain Euler step (the slope at 0 is undefined), as the twin does; it costs one evaluation.

    Arguments as every sampler's (see `loop`); deterministic (keys are ignored).
    """
    del keys

    def step(i, state: LatentsState) -> LatentsState:
        x, sigma, sigma_next = state.x, sigmas[i], sigmas[i + 1]
        derivative = (x - denoise(x, sigma)) / sigma
        dt = sigma_next - sigma
        x_euler = x + derivative * dt

        def corrected(_):
            derivative_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
            return x + (derivative + derivative_next) / 2 * dt

        return state.replace(x=jax.lax.cond(sigma_next > 0, corrected, lambda _: x_euler, None))

    state = LatentsState(x=x.astype(jnp.float32))
    return loop.run_steps(step, state, options.steps(sigmas), options).x


def samplers() -> list[Sampler]:
    """This file's registry entries."""
    return [
        Sampler("euler", sample_euler, euler_schedule, 1, "EulerDiscreteScheduler"),
        Sampler("euler_a", sample_euler_a, euler_a_schedule, 1, "EulerAncestralDiscreteScheduler", stochastic=True),
        Sampler("heun", sample_heun, heun_schedule, 2, "HeunDiscreteScheduler"),
    ]
