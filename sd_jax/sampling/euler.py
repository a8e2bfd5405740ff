"""Euler, Euler ancestral and Heun (Karras et al. 2022, Alg. 1-2), and the schedule diffusers' k-style twins share.

Twins: diffusers' EulerDiscreteScheduler, EulerAncestralDiscreteScheduler and HeunDiscreteScheduler. They step in
k-diffusion's `x = x0 + sigma * eps` through n sigmas spaced over the training timesteps (or Karras / exponential
sigmas between the spaced ends) and a final 0. Heun's twin lists each sigma twice to take its second evaluation;
here the schedule is the plain per-step list and the loop does both evaluations in one step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sd_jax.sampling import loop, schedules
from sd_jax.sampling.denoisers import Denoiser
from sd_jax.sampling.loop import StepHook

# The defaults of diffusers' Euler-type schedulers for keys a scheduler config may leave out; they differ from
# DDIM's (no leading spacing) and between twins (Heun and KDPM2 default to SD's betas).
EULER_DEFAULTS = {"timestep_spacing": "linspace", "beta_start": 0.0001, "beta_end": 0.02}
SD_BETA_DEFAULTS = {"timestep_spacing": "linspace", "beta_start": 0.00085, "beta_end": 0.012}


def _spaced_timesteps(spacing: str, n_train: int, num_steps: int, steps_offset: int) -> np.ndarray:
    """Descending float32 timesteps as the Euler-type twins space them (linspace keeps fractional timesteps)."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, num_steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = n_train // num_steps
        return (np.arange(num_steps) * ratio).round()[::-1].astype(np.float32) + np.float32(steps_offset)
    ratio = n_train / num_steps
    return np.arange(n_train, 0, -ratio).round().astype(np.float32) - np.float32(1.0)


def discrete_schedule(
    config: Mapping,
    num_steps: int,
    max_steps: int | None,
    schedule_type: str,
    *,
    twin_defaults: Mapping = EULER_DEFAULTS,
    round_karras_timesteps: bool = False,
    euler_options: bool = False,
) -> schedules.Schedule:
    """The sigmas and U-Net timesteps of a diffusers Euler-type scheduler's `set_timesteps(num_steps)`.

    Sigmas are the training sigmas interpolated (linearly in sigma) at the spaced timesteps; "karras" and
    "exponential" respace n sigmas between the first and last of those and find their (fractional) timesteps by
    log-sigma interpolation, as the twin does with use_karras_sigmas / use_exponential_sigmas. `schedule_type`
    "default" honours those flags when the config sets them.

    Args:
      config: a diffusers scheduler config (keys it lacks take the twin's defaults, `twin_defaults`).
      num_steps: n, the number of steps.
      max_steps: the padded length (>= num_steps), so that the step count is data.
      schedule_type: "default", "karras" or "exponential".
      twin_defaults: the twin's own defaults for keys the config may lack.
      round_karras_timesteps: KDPM2's twins round the timesteps of Karras sigmas.
      euler_options: honour the options only EulerDiscreteScheduler has: sigma_min / sigma_max (pin the ends of
        Karras / exponential sigmas) and final_sigmas_type ("zero" or "sigma_min").
    """
    config = {**twin_defaults, **config}
    s = schedules.scheduler_settings(config)
    if config.get("interpolation_type", "linear") != "linear":
        raise ValueError(f"interpolation_type {config['interpolation_type']!r} is not supported; use 'linear'")
    if config.get("timestep_type", "discrete") != "discrete":
        raise ValueError(f"timestep_type {config['timestep_type']!r} is not supported; use 'discrete'")
    if schedule_type == "default":
        if config.get("use_karras_sigmas"):
            schedule_type = "karras"
        elif config.get("use_exponential_sigmas"):
            schedule_type = "exponential"
    if schedule_type not in ("default", "karras", "exponential"):
        raise ValueError(f"unknown schedule type {schedule_type!r}")
    n_train = s["num_train_timesteps"]
    if not 1 <= num_steps <= n_train:
        raise ValueError(f"steps must be between 1 and {n_train}, got {num_steps}")
    max_steps = max(max_steps or num_steps, num_steps)

    train_sigmas = schedules.sigmas_from_alphas_cumprod(schedules.alphas_cumprod(config))
    timesteps = _spaced_timesteps(s["timestep_spacing"], n_train, num_steps, s["steps_offset"])
    sigmas = np.interp(timesteps.astype(np.float64), np.arange(n_train), train_sigmas)
    if schedule_type != "default":
        lo, hi = sigmas[-1], sigmas[0]
        if euler_options:
            lo = config["sigma_min"] if config.get("sigma_min") is not None else lo
            hi = config["sigma_max"] if config.get("sigma_max") is not None else hi
        if schedule_type == "karras":
            sigmas = schedules.sigmas_karras(num_steps, lo, hi)
        else:
            sigmas = schedules.sigmas_exponential(num_steps, lo, hi)
        timesteps = schedules.timesteps_of_sigmas(sigmas, train_sigmas)
        if schedule_type == "karras" and round_karras_timesteps:
            timesteps = np.round(timesteps)
    final_sigmas_type = config.get("final_sigmas_type", "zero") if euler_options else "zero"
    if final_sigmas_type not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type {final_sigmas_type!r} is not one of zero, sigma_min")
    final_sigma = train_sigmas[0] if final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [final_sigma]]).astype(np.float32)
    sigma_max = float(sigmas.max())
    # The twins start from noise of std sigma_max, but sqrt(sigma_max^2 + 1) with leading spacing.
    init_scale = sigma_max if s["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(sigma_max**2 + 1.0)
    schedule = schedules.pad_schedule(sigmas, timesteps, train_sigmas, max_steps, init_scale=init_scale)
    # The twin returns x at the final sigma as it is (no rescaling), also when that sigma is sigma_min.
    return dataclasses.replace(schedule, final_scale=1.0)


def euler_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> schedules.Schedule:
    """The schedule of `EulerDiscreteScheduler.from_config(config)`."""
    return discrete_schedule(config, num_steps, max_steps, schedule_type, euler_options=True)


def euler_a_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> schedules.Schedule:
    """The schedule of `EulerAncestralDiscreteScheduler.from_config(config)`.

    That twin has no Karras or exponential option; those respace as Euler's twin does.
    """
    return discrete_schedule(config, num_steps, max_steps, schedule_type)


def heun_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> schedules.Schedule:
    """The per-step schedule of `HeunDiscreteScheduler.from_config(config)` (its sigmas without the repeats)."""
    return discrete_schedule(config, num_steps, max_steps, schedule_type, twin_defaults=SD_BETA_DEFAULTS)


def ancestral_step(sigma: jnp.ndarray, sigma_next: jnp.ndarray, eta: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sigma_up, sigma_down) of an ancestral step from sigma to sigma_next: step deterministically to sigma_down,
    then add noise of std sigma_up, so that sigma_down^2 + sigma_up^2 = sigma_next^2. eta = 1 is the twins' step
    (DDPM-like); eta = 0 makes it deterministic."""
    full = jnp.sqrt(jnp.maximum(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0))
    sigma_up = jnp.minimum(sigma_next, eta * full)
    sigma_down = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0))
    return sigma_up, sigma_down


@struct.dataclass
class EulerState:
    x: jnp.ndarray  # (B, H, W, C) float32, at level sigmas[i]


def _start(x: jnp.ndarray, sigmas: jnp.ndarray, num_steps) -> tuple[EulerState, jnp.ndarray | int]:
    return EulerState(x=x.astype(jnp.float32)), sigmas.shape[0] - 1 if num_steps is None else num_steps


def sample_euler(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    *,
    num_steps: jnp.ndarray | int | None = None,
    keys: jnp.ndarray | None = None,
    python_loop: bool = False,
    after_step: StepHook | None = None,
) -> jnp.ndarray:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma.

    Args:
      denoise: `(x, sigma) -> x0`.
      x: (B, H, W, C) starting latents at level sigmas[0].
      sigmas: (max_steps + 1,) levels, padded past num_steps.
      num_steps: steps to take (may be traced); defaults to len(sigmas) - 1.
      keys: unused (deterministic); accepted so that every sampler takes the same arguments.
      python_loop: a plain Python loop for debugging.
      after_step: `(i, x) -> x` applied after each step (see `loop.run_steps`).

    Returns:
      (B, H, W, C) float32 latents at level sigmas[num_steps].
    """
    del keys

    def step(i, state: EulerState) -> EulerState:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        derivative = (state.x - denoise(state.x, sigma)) / sigma
        return state.replace(x=state.x + derivative * (sigma_next - sigma))

    state, num_steps = _start(x, sigmas, num_steps)
    return loop.run_steps(step, state, num_steps, python_loop, after_step).x


def sample_euler_a(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    *,
    num_steps: jnp.ndarray | int | None = None,
    keys: jnp.ndarray | None = None,
    eta: jnp.ndarray | float = 1.0,
    s_noise: jnp.ndarray | float = 1.0,
    python_loop: bool = False,
    after_step: StepHook | None = None,
) -> jnp.ndarray:
    """Euler ancestral: an Euler step to sigma_down, then fresh noise of std sigma_up (see `ancestral_step`).

    Args as `sample_euler`, and:
      keys: (B,) per-image PRNG keys (required); step i draws `loop.image_noise(keys, i, ...)`.
      eta: the share of the step's noise that is fresh (1 is the twin; 0 is plain Euler).
      s_noise: scales the fresh noise.
    """
    if keys is None:
        raise ValueError("euler_a draws noise: pass keys (one PRNG key per image)")
    eta = jnp.asarray(eta, jnp.float32)
    s_noise = jnp.asarray(s_noise, jnp.float32)

    def step(i, state: EulerState) -> EulerState:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_up, sigma_down = ancestral_step(sigma, sigma_next, eta)
        derivative = (state.x - denoise(state.x, sigma)) / sigma
        x = state.x + derivative * (sigma_down - sigma)
        noise = loop.image_noise(keys, i, x.shape[1:])
        return state.replace(x=x + noise * (s_noise * sigma_up))

    state, num_steps = _start(x, sigmas, num_steps)
    return loop.run_steps(step, state, num_steps, python_loop, after_step).x


def sample_heun(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    *,
    num_steps: jnp.ndarray | int | None = None,
    keys: jnp.ndarray | None = None,
    python_loop: bool = False,
    after_step: StepHook | None = None,
) -> jnp.ndarray:
    """Heun's second-order method: an Euler step, then the average of the slopes at both ends. The step to
    sigma = 0 is a plain Euler step (the slope at 0 is undefined), as the twin does; it costs one evaluation.

    Args as `sample_euler`.
    """
    del keys

    def step(i, state: EulerState) -> EulerState:
        x, sigma, sigma_next = state.x, sigmas[i], sigmas[i + 1]
        derivative = (x - denoise(x, sigma)) / sigma
        dt = sigma_next - sigma
        x_euler = x + derivative * dt

        def corrected(_):
            derivative_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
            return x + (derivative + derivative_next) / 2 * dt

        return state.replace(x=jax.lax.cond(sigma_next > 0, corrected, lambda _: x_euler, None))

    state, num_steps = _start(x, sigmas, num_steps)
    return loop.run_steps(step, state, num_steps, python_loop, after_step).x


def samplers() -> list:
    """This file's samplers, for the registry in samplers.py (imported here to avoid an import cycle)."""
    from sd_jax.sampling.samplers import Sampler

    return [
        Sampler("euler", sample_euler, euler_schedule, 1, "EulerDiscreteScheduler"),
        Sampler("euler_a", sample_euler_a, euler_a_schedule, 1, "EulerAncestralDiscreteScheduler", stochastic=True),
        Sampler("heun", sample_heun, heun_schedule, 2, "HeunDiscreteScheduler"),
    ]
