"""DPM-Solver++ samplers (Lu et al. 2022, arXiv:2211.01095) in k-diffusion form, each as one `lax.fori_loop`.

In the variance-preserving form a DPM-Solver++ step from level s to level t reads
`x_t^vp = (sigma_t^vp / sigma_s^vp) x_s^vp - alpha_t (e^{-h} - 1) D`, with `lambda = log(alpha / sigma^vp) = -log sigma`
and `h = lambda_t - lambda_s`. Dividing by `alpha_t` (`x = x^vp / alpha`, `sigma^vp / alpha = sigma`) gives
`x_t = (sigma_t / sigma_s) x_s + (1 - sigma_t / sigma_s) D`: the same step on k-diffusion's `x = x0 + sigma * eps`,
with `e^{-h} = sigma_t / sigma_s`. The samplers below are written that way, with ratios of sigmas rather than
exponentials of log-sigma differences, so that a last step to sigma 0 needs no special case.

- `dpmpp_2m`: diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2), midpoint.
- `dpmpp_2m_sde`: the same scheduler with algorithm_type="sde-dpmsolver++" (eta_ancestral=1); eta_ancestral scales
  the noise as k-diffusion's `sample_dpmpp_2m_sde` eta does.
- `dpmpp_2s_a`: k-diffusion's `sample_dpmpp_2s_ancestral` (2 calls per step); no diffusers twin.
- `dpmpp_sde`: k-diffusion's `sample_dpmpp_sde` (2 calls per step). k-diffusion (and diffusers'
  DPMSolverSDEScheduler) draws the two correlated noises of a step from one Brownian tree (torchsde); here they are
  built from two normal draws keyed per image and step with the same joint law, so results match those
  implementations in distribution, not sample for sample.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import struct

from sd_jax.sampling import loop, schedules
from sd_jax.sampling.denoisers import Denoiser
from sd_jax.sampling.loop import DEFAULT_OPTIONS, LatentsState, Sampler, SamplerOptions

# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------


def dpm_multistep_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> schedules.Schedule:
    """The schedule of `DPMSolverMultistepScheduler.from_config(config)` after `set_timesteps(num_steps)`."""
    return schedules.multistep_schedule(config, num_steps, max_steps, schedule_type, twin="dpmsolver")


def k_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> schedules.Schedule:
    """k-diffusion style levels, the main sigmas of diffusers' DPMSolverSDEScheduler: the same spacing as
    EulerDiscreteScheduler's (timesteps spaced by timestep_spacing, default "linspace"; their interpolated sigmas;
    then 0), so the Euler family's schedule serves."""
    return schedules.discrete_schedule(config, num_steps, max_steps, schedule_type)


# ---------------------------------------------------------------------------------------------------------------
# Multistep: DPM++ 2M and DPM++ 2M SDE
# ---------------------------------------------------------------------------------------------------------------


@struct.dataclass
class MultistepState:
    x: jnp.ndarray  # (B, H, W, C) at level sigmas[i]
    old_denoised: jnp.ndarray  # (B, H, W, C) the denoised of step i - 1 (unused at i = 0)
    h_last: jnp.ndarray  # () float32: log(sigmas[i - 1] / sigmas[i])


def _dpmpp_2m_loop(denoise, x, sigmas, keys, options: SamplerOptions, stochastic: bool):
    num_steps = jnp.asarray(options.steps(sigmas), jnp.int32)
    eta = jnp.asarray(options.eta_ancestral, jnp.float32)
    s_noise = jnp.asarray(options.s_noise, jnp.float32)
    if stochastic:
        loop.require_keys(keys, "dpmpp_2m_sde")

    def step(i, state: MultistepState) -> MultistepState:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(state.x, sigma)
        ratio = sigma_next / sigma  # e^{-h}
        h = jnp.log(sigma / jnp.where(sigma_next > 0, sigma_next, 1.0))
        # The twin's warm-up (first step) and lower_order_final: the last step is first order when it goes to
        # sigma 0 or when there are fewer than 15 steps.
        last = i == num_steps - 1
        first_order = (i == 0) | (last & ((sigma_next == 0) | (num_steps < 15)))
        safe_h_last = jnp.where(first_order, 1.0, state.h_last)
        second = denoised + (0.5 * h / safe_h_last) * (denoised - state.old_denoised)  # D0 + D1 / 2 (midpoint)
        d = jnp.where(first_order, denoised, second)
        if stochastic:
            # x' = r^{1+eta} x + (1 - r^{1+eta}) D + sigma' sqrt(1 - r^{2 eta}) z, r = sigma' / sigma.
            decay = ratio * ratio**eta
            noise = loop.image_noise(keys, i, x.shape[1:])
            noise_scale = sigma_next * jnp.sqrt(jnp.maximum(1.0 - ratio ** (2.0 * eta), 0.0)) * s_noise
            x_next = decay * state.x + (1.0 - decay) * d + noise_scale * noise
        else:
            x_next = ratio * state.x + (1.0 - ratio) * d
        return state.replace(x=x_next, old_denoised=denoised, h_last=h)

    x = x.astype(jnp.float32)
    state = MultistepState(x=x, old_denoised=jnp.zeros_like(x), h_last=jnp.ones((), jnp.float32))
    return loop.run_steps(step, state, num_steps, options).x


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    keys: jnp.ndarray | None = None,
    options: SamplerOptions = DEFAULT_OPTIONS,
) -> jnp.ndarray:
    """DPM-Solver++(2M), midpoint form, one call per step.

    Arguments as every sampler's (see `loop`); deterministic (keys are ignored).
    """
    del keys
    return _dpmpp_2m_loop(denoise, x, sigmas, None, options, stochastic=False)


def sample_dpmpp_2m_sde(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    keys: jnp.ndarray | None = None,
    options: SamplerOptions = DEFAULT_OPTIONS,
) -> jnp.ndarray:
    """DPM-Solver++(2M) SDE, midpoint form (1 call per step). Step i's noise is `image_noise(keys, i, ..., salt=0)`.

    Arguments as every sampler's (see `loop`); keys are required. options.eta_ancestral=1 is diffusers'
    sde-dpmsolver++, 0 the deterministic DPM++ 2M; options.s_noise scales the injected noise.
    """
    return _dpmpp_2m_loop(denoise, x, sigmas, keys, options, stochastic=True)


# ---------------------------------------------------------------------------------------------------------------
# Singlestep, two calls per step: DPM++ 2S ancestral and DPM++ SDE
# ---------------------------------------------------------------------------------------------------------------


def _first_order(x, denoised, sigma, sigma_to):
    """The DPM-Solver++(1) step (= DDIM) from sigma to sigma_to: D + (sigma_to / sigma) (x - D)."""
    return denoised + (sigma_to / sigma) * (x - denoised)


def sample_dpmpp_2s_a(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    keys: jnp.ndarray | None = None,
    options: SamplerOptions = DEFAULT_OPTIONS,
) -> jnp.ndarray:
    """DPM-Solver++(2S) ancestral (k-diffusion's `sample_dpmpp_2s_ancestral`), 2 calls per step.

    Each step goes deterministically to sigma_down with a second-order singlestep update through the log-sigma
    midpoint sqrt(sigma * sigma_down), then adds noise sigma_up (image_noise salt 0). A step to sigma 0 is a
    plain denoise (one call; the second is skipped by `lax.cond`). Arguments as every sampler's (see `loop`); keys
    are required; reads options.eta_ancestral and s_noise.
    """
    loop.require_keys(keys, "dpmpp_2s_a")
    eta = jnp.asarray(options.eta_ancestral, jnp.float32)
    s_noise = jnp.asarray(options.s_noise, jnp.float32)

    def step(i, state: LatentsState) -> LatentsState:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(state.x, sigma)
        up, down = schedules.ancestral_step(sigma, sigma_next, eta)

        def second_order(_):
            mid = jnp.sqrt(sigma * down)
            x_mid = _first_order(state.x, denoised, sigma, mid)
            return _first_order(state.x, denoise(x_mid, mid), sigma, down)

        x_next = jax.lax.cond(down > 0, second_order, lambda _: denoised, None)
        noise = loop.image_noise(keys, i, x.shape[1:])
        x_next = x_next + jnp.where(sigma_next > 0, up * s_noise, 0.0) * noise
        return state.replace(x=x_next)

    state = LatentsState(x=x.astype(jnp.float32))
    return loop.run_steps(step, state, options.steps(sigmas), options).x


def sample_dpmpp_sde(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    keys: jnp.ndarray | None = None,
    options: SamplerOptions = DEFAULT_OPTIONS,
) -> jnp.ndarray:
    """DPM-Solver++ SDE (k-diffusion's `sample_dpmpp_sde`, r = 1/2), 2 calls per step.

    An ancestral first-order half step to the log-sigma midpoint s = sqrt(sigma * sigma_next), a call there, then
    an ancestral step from x to sigma_next with that midpoint's denoised. The two noises are increments of one
    Brownian path in sigma over [s, sigma] and [sigma_next, sigma], built from two independent draws per step
    (image_noise salts 0 and 1): the joint law of k-diffusion's Brownian-tree noise, not its samples. (Independent
    noises would lose their correlation and with it ~18% of the variance at 30 steps.) A step to sigma 0 is a plain
    denoise (one call). Arguments as every sampler's (see `loop`); keys are required; reads options.eta_ancestral
    and s_noise.
    """
    loop.require_keys(keys, "dpmpp_sde")
    eta = jnp.asarray(options.eta_ancestral, jnp.float32)
    s_noise = jnp.asarray(options.s_noise, jnp.float32)

    def step(i, state: LatentsState) -> LatentsState:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(state.x, sigma)

        def two_stage(_):
            mid = jnp.sqrt(sigma * sigma_next)
            # One Brownian path over [sigma_next, sigma] (time = sigma, as k-diffusion's noise sampler): the
            # first noise is its increment over [mid, sigma], the second over [sigma_next, sigma], normalised.
            first = loop.image_noise(keys, i, x.shape[1:], 0)
            rest = loop.image_noise(keys, i, x.shape[1:], 1)
            w_first, w_rest = jnp.sqrt(sigma - mid), jnp.sqrt(mid - sigma_next)
            whole = (w_first * first + w_rest * rest) / jnp.sqrt(sigma - sigma_next)
            up, down = schedules.ancestral_step(sigma, mid, eta)
            x_mid = _first_order(state.x, denoised, sigma, down) + up * s_noise * first
            denoised_mid = denoise(x_mid, mid)
            up, down = schedules.ancestral_step(sigma, sigma_next, eta)
            return _first_order(state.x, denoised_mid, sigma, down) + up * s_noise * whole

        x_next = jax.lax.cond(sigma_next > 0, two_stage, lambda _: denoised, None)
        return state.replace(x=x_next)

    state = LatentsState(x=x.astype(jnp.float32))
    return loop.run_steps(step, state, options.steps(sigmas), options).x


def samplers() -> list[Sampler]:
    """This file's registry entries."""
    return [
        Sampler(
            "dpmpp_2m",
            sample_dpmpp_2m,
            dpm_multistep_schedule,
            1,
            'DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)',
        ),
        Sampler(
            "dpmpp_2m_sde",
            sample_dpmpp_2m_sde,
            dpm_multistep_schedule,
            1,
            'DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2) (eta=1)',
            stochastic=True,
        ),
        Sampler(
            "dpmpp_2s_a",
            sample_dpmpp_2s_a,
            k_schedule,
            2,
            "k-diffusion sample_dpmpp_2s_ancestral (no diffusers twin); levels of DPMSolverSDEScheduler",
            stochastic=True,
        ),
        Sampler(
            "dpmpp_sde",
            sample_dpmpp_sde,
            k_schedule,
            2,
            "k-diffusion sample_dpmpp_sde, its two noises per step Brownian increments from the image key (no tree); "
            "levels of DPMSolverSDEScheduler",
            stochastic=True,
        ),
    ]
