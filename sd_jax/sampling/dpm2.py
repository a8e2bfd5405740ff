"""DPM2 and DPM2 ancestral (k-diffusion's second-order midpoint samplers, after Lu et al. 2022's DPM-Solver-2).

Twins: diffusers' KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler. Each step evaluates the denoiser at
sigma, takes an Euler step to the log-space midpoint sqrt(sigma * sigma_target) (the geometric mean), evaluates
there, and steps the whole way with the midpoint slope. The twins interleave the midpoint sigmas and timesteps into
their lists; here the schedule is the plain per-step list, and the midpoint's U-Net timestep is the denoiser's
log-sigma interpolation, as the twins compute it. A step that ends at sigma = 0 is a plain Euler step.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from sd_jax.sampling import loop, schedules
from sd_jax.sampling.denoisers import Denoiser
from sd_jax.sampling.loop import DEFAULT_OPTIONS, LatentsState, Sampler, SamplerOptions


def dpm2_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> schedules.Schedule:
    """The per-step schedule of `KDPM2DiscreteScheduler.from_config(config)` (without its interleaved midpoints;
    its Karras timesteps are rounded)."""
    return schedules.discrete_schedule(
        config,
        num_steps,
        max_steps,
        schedule_type,
        twin_defaults=schedules.SD_BETA_DEFAULTS,
        round_karras_timesteps=True,
    )


def dpm2_a_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> schedules.Schedule:
    """The per-step schedule of `KDPM2AncestralDiscreteScheduler.from_config(config)` (as `dpm2_schedule`)."""
    return dpm2_schedule(config, num_steps, max_steps, schedule_type)


def _midpoint_step(denoise: Denoiser, x, derivative, sigma, sigma_target, sigma_next):
    """x moved from sigma to sigma_target with the slope at their log-space midpoint; an Euler step (one denoiser
    call fewer) where sigma_target is 0. sigma_next is the level the next step starts from."""

    def midpoint(_):
        sigma_mid = jnp.exp(0.5 * (jnp.log(sigma) + jnp.log(sigma_target)))
        # The midpoint's U-Net timestep is interpolated from its sigma, as the twins do. With eta = 1 the ancestral
        # midpoint sqrt(sigma * sigma_down) is sigma_next up to rounding; where it is exactly sigma_next the
        # denoiser would take the schedule's own timestep of sigma_next (rounded, for the twins' Karras sigmas).
        # So a midpoint within rounding of sigma_next becomes the float32 just above it, which interpolates.
        near = jnp.abs(sigma_mid - sigma_next) <= 1e-6 * sigma_next
        sigma_mid = jnp.where(near, jnp.nextafter(sigma_next, jnp.float32(jnp.inf)), sigma_mid)
        x_mid = x + derivative * (sigma_mid - sigma)
        derivative_mid = (x_mid - denoise(x_mid, sigma_mid)) / sigma_mid
        return x + derivative_mid * (sigma_target - sigma)

    return jax.lax.cond(sigma_target > 0, midpoint, lambda _: x + derivative * (sigma_target - sigma), None)


def sample_dpm2(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    keys: jnp.ndarray | None = None,
    options: SamplerOptions = DEFAULT_OPTIONS,
) -> jnp.ndarray:
    """DPM2: two denoiser evaluations per step (one on the last step, which ends at 0).

    Arguments as every sampler's (see `loop`); deterministic (keys are ignored).
    """
    del keys

    def step(i, state: LatentsState) -> LatentsState:
        x, sigma = state.x, sigmas[i]
        derivative = (x - denoise(x, sigma)) / sigma
        return state.replace(x=_midpoint_step(denoise, x, derivative, sigma, sigmas[i + 1], sigmas[i + 1]))

    state = LatentsState(x=x.astype(jnp.float32))
    return loop.run_steps(step, state, options.steps(sigmas), options).x


def sample_dpm2_a(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    keys: jnp.ndarray | None = None,
    options: SamplerOptions = DEFAULT_OPTIONS,
) -> jnp.ndarray:
    """DPM2 ancestral: a DPM2 step to sigma_down, then fresh noise of std sigma_up (`schedules.ancestral_step`).

    Arguments as every sampler's (see `loop`); keys are required (step i draws `loop.image_noise(keys, i, ...)`).
    Reads options.eta_ancestral (1 is the twin; 0 is deterministic) and s_noise (scales the fresh noise).
    """
    loop.require_keys(keys, "dpm2_a")
    eta = jnp.asarray(options.eta_ancestral, jnp.float32)
    s_noise = jnp.asarray(options.s_noise, jnp.float32)

    def step(i, state: LatentsState) -> LatentsState:
        x, sigma = state.x, sigmas[i]
        sigma_up, sigma_down = schedules.ancestral_step(sigma, sigmas[i + 1], eta)
        derivative = (x - denoise(x, sigma)) / sigma
        x = _midpoint_step(denoise, x, derivative, sigma, sigma_down, sigmas[i + 1])
        noise = loop.image_noise(keys, i, x.shape[1:])
        return state.replace(x=x + noise * (s_noise * sigma_up))

    state = LatentsState(x=x.astype(jnp.float32))
    return loop.run_steps(step, state, options.steps(sigmas), options).x


def samplers() -> list[Sampler]:
    """This file's registry entries."""
    return [
        Sampler("dpm2", sample_dpm2, dpm2_schedule, 2, "KDPM2DiscreteScheduler"),
        Sampler("dpm2_a", sample_dpm2_a, dpm2_a_schedule, 2, "KDPM2AncestralDiscreteScheduler", stochastic=True),
    ]
