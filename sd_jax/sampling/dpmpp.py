"""DPM-Solver++ samplers (Lu et al. 2022, arXiv:2211.01095) in k-diffusion form, each as one `lax.fori_loop`.

In the variance-preserving form a DPM-Solver++ step from level s to level t reads
`x_t^vp = (sigma_t^vp / sigma_s^vp) x_s^vp - alpha_t (e^{-h} - 1) D`, with `lambda = log(alpha / sigma^vp) = -log sigma`
and `h = lambda_t - lambda_s`. Dividing by `alpha_t` (`x = x^vp / alpha`, `sigma^vp / alpha = sigma`) gives
`x_t = (sigma_t / sigma_s) x_s + (1 - sigma_t / sigma_s) D`: the same step on k-diffusion's `x = x0 + sigma * eps`,
with `e^{-h} = sigma_t / sigma_s`. The samplers below are written that way, with ratios of sigmas rather than
exponentials of log-sigma differences, so that a last step to sigma 0 needs no special case.

- `dpmpp_2m`: diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2), midpoint.
- `dpmpp_2m_sde`: the same scheduler with algorithm_type="sde-dpmsolver++" (eta=1); eta scales the noise as
  k-diffusion's `sample_dpmpp_2m_sde` does.
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
import numpy as np
from flax import struct

from sd_jax.sampling import schedules
from sd_jax.sampling.denoisers import Denoiser
from sd_jax.sampling.euler import discrete_schedule
from sd_jax.sampling.loop import StepHook, image_noise, run_steps

# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------


def float32_train_sigmas(config: Mapping) -> np.ndarray:
    """The training sigmas as diffusers' multistep schedulers compute them: alphas_cumprod in float32.

    At the smallest sigmas float32's `1 - alphas_cumprod` is off by up to 1e-4 relative; the twins build their
    schedules (karras ends, spaced sigmas) from those values, so we do too.
    """
    acp = schedules.alphas_cumprod(config)
    alphas = np.concatenate([acp[:1], acp[1:] / acp[:-1]]).astype(np.float32)
    acp32 = np.cumprod(alphas, dtype=np.float32)
    return np.sqrt((np.float32(1.0) - acp32) / acp32).astype(np.float64)


def _spaced_sigmas(kind: str, n: int, train_sigmas: np.ndarray) -> np.ndarray:
    """karras or exponential sigmas over the training range."""
    lo, hi = float(train_sigmas[0]), float(train_sigmas[-1])
    if kind == "karras":
        return schedules.sigmas_karras(n, lo, hi)
    if kind == "exponential":
        return schedules.sigmas_exponential(n, lo, hi)
    raise ValueError(f"unknown schedule type {kind!r}")


def dpm_multistep_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> schedules.Schedule:
    """The schedule of `DPMSolverMultistepScheduler.from_config(config)` after `set_timesteps(num_steps)`."""
    return multistep_schedule(config, num_steps, max_steps, schedule_type, twin="dpmsolver")


def multistep_schedule(
    config: Mapping,
    num_steps: int,
    max_steps: int | None = None,
    schedule_type: str = "default",
    *,
    twin: str = "dpmsolver",
) -> schedules.Schedule:
    """The schedule of `DPMSolverMultistepScheduler.from_config(config)` (twin="dpmsolver") or
    `UniPCMultistepScheduler.from_config(config)` (twin="unipc"), which space timesteps the same way, after
    `set_timesteps(num_steps)`; karras / exponential are the twin with use_karras_sigmas / use_exponential_sigmas.

    The twin's own defaults apply where the config lacks a key: timestep_spacing "linspace", final_sigmas_type
    "zero" (the last step goes to sigma 0).
    """
    s = schedules.scheduler_settings(config)
    n_train = s["num_train_timesteps"]
    if not 1 <= num_steps <= n_train:
        raise ValueError(f"steps must be between 1 and {n_train}, got {num_steps}")
    max_steps = max(max_steps or num_steps, num_steps)
    spacing = config.get("timestep_spacing", "linspace")
    train_sigmas = float32_train_sigmas(config)
    n = num_steps
    # n + 1 points with the last (timestep 0) dropped; "last_timestep" is n_train (no lambda_min clipping).
    if spacing == "linspace":
        timesteps = np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = n_train // (n + 1)
        timesteps = (np.arange(n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + s["steps_offset"]
    elif spacing == "trailing":
        timesteps = np.arange(n_train, 0, -n_train / n).round().astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not one of leading, trailing, linspace")
    if schedule_type == "default":
        sigmas = train_sigmas[timesteps]
    else:
        sigmas = _spaced_sigmas(schedule_type, n, train_sigmas)
        timesteps = schedules.timesteps_of_sigmas(sigmas, train_sigmas)
        # Both twins round karras timesteps (DPMSolver not for the cosine schedule) and truncate the others.
        if schedule_type == "karras" and (twin == "unipc" or s["beta_schedule"] != "squaredcos_cap_v2"):
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)
    final_type = config.get("final_sigmas_type", "zero")
    if final_type not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type {final_type!r} is not one of zero, sigma_min")
    last = 0.0 if final_type == "zero" else train_sigmas[0]
    if schedule_type != "default" and final_type == "sigma_min" and twin == "unipc":
        last = sigmas[-1]  # UniPC ends karras / exponential schedules at their own smallest sigma
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return schedules.pad_schedule(
        sigmas, timesteps, train_sigmas, max_steps, init_scale=float(np.sqrt(1.0 + float(sigmas[0]) ** 2))
    )


def k_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> schedules.Schedule:
    """k-diffusion style levels, the main sigmas of diffusers' DPMSolverSDEScheduler: the same spacing as
    EulerDiscreteScheduler's (timesteps spaced by timestep_spacing, default "linspace"; their interpolated sigmas;
    then 0), so the Euler family's schedule serves."""
    return discrete_schedule(config, num_steps, max_steps, schedule_type)


# ---------------------------------------------------------------------------------------------------------------
# Multistep: DPM++ 2M and DPM++ 2M SDE
# ---------------------------------------------------------------------------------------------------------------


@struct.dataclass
class MultistepState:
    x: jnp.ndarray  # (B, H, W, C) at level sigmas[i]
    old_denoised: jnp.ndarray  # (B, H, W, C) the denoised of step i - 1 (unused at i = 0)
    h_last: jnp.ndarray  # () float32: log(sigmas[i - 1] / sigmas[i])


def _dpmpp_2m_loop(denoise, x, sigmas, num_steps, keys, eta, s_noise, python_loop, after_step, stochastic):
    if num_steps is None:
        num_steps = sigmas.shape[0] - 1
    num_steps = jnp.asarray(num_steps, jnp.int32)
    eta = jnp.asarray(eta, jnp.float32)
    s_noise = jnp.asarray(s_noise, jnp.float32)
    if stochastic and keys is None:
        raise ValueError("a stochastic sampler needs per-image keys")

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
            noise = image_noise(keys, i, x.shape[1:])
            noise_scale = sigma_next * jnp.sqrt(jnp.maximum(1.0 - ratio ** (2.0 * eta), 0.0)) * s_noise
            x_next = decay * state.x + (1.0 - decay) * d + noise_scale * noise
        else:
            x_next = ratio * state.x + (1.0 - ratio) * d
        return state.replace(x=x_next, old_denoised=denoised, h_last=h)

    x = x.astype(jnp.float32)
    state = MultistepState(x=x, old_denoised=jnp.zeros_like(x), h_last=jnp.ones((), jnp.float32))
    return run_steps(step, state, num_steps, python_loop, after_step).x


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    *,
    num_steps: jnp.ndarray | int | None = None,
    keys: jnp.ndarray | None = None,
    python_loop: bool = False,
    after_step: StepHook | None = None,
) -> jnp.ndarray:
    """DPM-Solver++(2M), midpoint form, from `x` (B, H, W, C) at sigmas[0] to sigmas[num_steps] (1 call per step).

    Args:
      denoise: `(x, sigma) -> x0`.
      x: starting latents, already scaled to sigmas[0].
      sigmas: (max_steps + 1,) levels, padded past num_steps.
      num_steps: steps to take (data: may be traced); defaults to len(sigmas) - 1.
      keys: unused (deterministic).
      python_loop: plain Python loop for debugging.
      after_step: `(i, x) -> x` applied after each step (see `loop.run_steps`).
    """
    del keys
    return _dpmpp_2m_loop(denoise, x, sigmas, num_steps, None, 0.0, 0.0, python_loop, after_step, stochastic=False)


def sample_dpmpp_2m_sde(
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
    """DPM-Solver++(2M) SDE, midpoint form (1 call per step). Step i's noise is `image_noise(keys, i, ..., salt=0)`.

    eta=1 is diffusers' sde-dpmsolver++; eta=0 is the deterministic DPM++ 2M. s_noise scales the injected noise.
    """
    return _dpmpp_2m_loop(denoise, x, sigmas, num_steps, keys, eta, s_noise, python_loop, after_step, stochastic=True)


# ---------------------------------------------------------------------------------------------------------------
# Singlestep, two calls per step: DPM++ 2S ancestral and DPM++ SDE
# ---------------------------------------------------------------------------------------------------------------


@struct.dataclass
class SinglestepState:
    x: jnp.ndarray  # (B, H, W, C) at level sigmas[i]


def _ancestral_split(sigma_from, sigma_to, eta):
    """(sigma_down, sigma_up): a deterministic step to sigma_down plus fresh noise sigma_up reaches sigma_to."""
    up = jnp.minimum(
        sigma_to, eta * jnp.sqrt(jnp.maximum(sigma_to**2 * (sigma_from**2 - sigma_to**2), 0.0)) / sigma_from
    )
    down = jnp.sqrt(jnp.maximum(sigma_to**2 - up**2, 0.0))
    return down, up


def _first_order(x, denoised, sigma, sigma_to):
    """The DPM-Solver++(1) step (= DDIM) from sigma to sigma_to: D + (sigma_to / sigma) (x - D)."""
    return denoised + (sigma_to / sigma) * (x - denoised)


def sample_dpmpp_2s_a(
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
    """DPM-Solver++(2S) ancestral (k-diffusion's `sample_dpmpp_2s_ancestral`), 2 calls per step.

    Each step goes deterministically to sigma_down with a second-order singlestep update through the log-sigma
    midpoint sqrt(sigma * sigma_down), then adds noise sigma_up (image_noise salt 0). A step to sigma 0 is a
    plain denoise (one call; the second is skipped by `lax.cond`).
    """
    if num_steps is None:
        num_steps = sigmas.shape[0] - 1
    if keys is None:
        raise ValueError("a stochastic sampler needs per-image keys")
    eta = jnp.asarray(eta, jnp.float32)
    s_noise = jnp.asarray(s_noise, jnp.float32)

    def step(i, state: SinglestepState) -> SinglestepState:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(state.x, sigma)
        down, up = _ancestral_split(sigma, sigma_next, eta)

        def second_order(_):
            mid = jnp.sqrt(sigma * down)
            x_mid = _first_order(state.x, denoised, sigma, mid)
            return _first_order(state.x, denoise(x_mid, mid), sigma, down)

        x_next = jax.lax.cond(down > 0, second_order, lambda _: denoised, None)
        noise = image_noise(keys, i, x.shape[1:])
        x_next = x_next + jnp.where(sigma_next > 0, up * s_noise, 0.0) * noise
        return state.replace(x=x_next)

    return run_steps(step, SinglestepState(x=x.astype(jnp.float32)), num_steps, python_loop, after_step).x


def sample_dpmpp_sde(
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
    """DPM-Solver++ SDE (k-diffusion's `sample_dpmpp_sde`, r = 1/2), 2 calls per step.

    An ancestral first-order half step to the log-sigma midpoint s = sqrt(sigma * sigma_next), a call there, then
    an ancestral step from x to sigma_next with that midpoint's denoised. The two noises are increments of one
    Brownian path in sigma over [s, sigma] and [sigma_next, sigma], built from two independent draws per step
    (image_noise salts 0 and 1): the joint law of k-diffusion's Brownian-tree noise, not its samples. (Independent
    noises would lose their correlation and with it ~18% of the variance at 30 steps.) A step to sigma 0 is a plain
    denoise (one call).
    """
    if num_steps is None:
        num_steps = sigmas.shape[0] - 1
    if keys is None:
        raise ValueError("a stochastic sampler needs per-image keys")
    eta = jnp.asarray(eta, jnp.float32)
    s_noise = jnp.asarray(s_noise, jnp.float32)

    def step(i, state: SinglestepState) -> SinglestepState:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(state.x, sigma)

        def two_stage(_):
            mid = jnp.sqrt(sigma * sigma_next)
            # One Brownian path over [sigma_next, sigma] (time = sigma, as k-diffusion's noise sampler): the
            # first noise is its increment over [mid, sigma], the second over [sigma_next, sigma], normalised.
            first = image_noise(keys, i, x.shape[1:], 0)
            rest = image_noise(keys, i, x.shape[1:], 1)
            w_first, w_rest = jnp.sqrt(sigma - mid), jnp.sqrt(mid - sigma_next)
            whole = (w_first * first + w_rest * rest) / jnp.sqrt(sigma - sigma_next)
            down, up = _ancestral_split(sigma, mid, eta)
            x_mid = _first_order(state.x, denoised, sigma, down) + up * s_noise * first
            denoised_mid = denoise(x_mid, mid)
            down, up = _ancestral_split(sigma, sigma_next, eta)
            return _first_order(state.x, denoised_mid, sigma, down) + up * s_noise * whole

        x_next = jax.lax.cond(sigma_next > 0, two_stage, lambda _: denoised, None)
        return state.replace(x=x_next)

    return run_steps(step, SinglestepState(x=x.astype(jnp.float32)), num_steps, python_loop, after_step).x


def samplers() -> list:
    """The registry entries of this file."""
    from sd_jax.sampling.samplers import Sampler

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
