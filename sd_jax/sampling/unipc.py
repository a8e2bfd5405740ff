"""UniPC (Zhao et al. 2023, arXiv:2302.04867), order 2, B(h) = e^h - 1 ("bh2"), data prediction, in k-diffusion form.

The twin is diffusers' UniPCMultistepScheduler with its defaults (solver_order=2, solver_type="bh2",
predict_x0=True, lower_order_final=True, final_sigmas_type="zero"). Each step makes one denoiser call, at the
predictor's output; that output first corrects the sample the predictor started from (UniC), then the predictor
(UniP) moves on from the corrected sample. As for DPM-Solver++, dividing the variance-preserving update by
alpha_t turns `sigma_t^vp / sigma_s^vp x_s^vp - alpha_t (e^{-h} - 1) m` into `(sigma_t / sigma_s) x_s - (e^{-h} - 1) m`
on `x = x0 + sigma * eps`, with `-h = log(sigma_t / sigma_s)`. UniP-2 with bh2 is exactly DPM-Solver++(2M).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
from flax import struct

from sd_jax.sampling import loop, schedules
from sd_jax.sampling.denoisers import Denoiser
from sd_jax.sampling.loop import DEFAULT_OPTIONS, Sampler, SamplerOptions


def unipc_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> schedules.Schedule:
    """The schedule of `UniPCMultistepScheduler.from_config(config)` after `set_timesteps(num_steps)`."""
    return schedules.multistep_schedule(config, num_steps, max_steps, schedule_type, twin="unipc")


@struct.dataclass
class UniPCState:
    x: jnp.ndarray  # (B, H, W, C) the predictor's output at level sigmas[i], not yet corrected
    x_last: jnp.ndarray  # the corrected sample at sigmas[i - 1] that the predictor started from
    denoised_1: jnp.ndarray  # the denoised at step i - 1
    denoised_2: jnp.ndarray  # the denoised at step i - 2


def _phis(log_ratio):
    """UniPC's h*phi_1 (= B(h) for bh2) and b_1, b_2 of its order conditions, for hh = -h = log(sigma_t / sigma_s)."""
    phi1 = jnp.expm1(log_ratio)
    hphi_1 = phi1 / log_ratio - 1.0
    hphi_2 = hphi_1 / log_ratio - 0.5
    return phi1, hphi_1 / phi1, 2.0 * hphi_2 / phi1


def sample_unipc(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    keys: jnp.ndarray | None = None,
    options: SamplerOptions = DEFAULT_OPTIONS,
) -> jnp.ndarray:
    """UniPC-2 (bh2), one call per step; the last level used may be 0.

    Arguments as every sampler's (see `loop`); deterministic (keys are ignored).
    """
    del keys
    num_steps = jnp.asarray(options.steps(sigmas), jnp.int32)
    log_sigmas = jnp.log(jnp.maximum(sigmas, 1e-30))  # the level 0 only ever appears as a predictor's target

    def step(i, state: UniPCState) -> UniPCState:
        sigma = sigmas[i]
        denoised = denoise(state.x, sigma)
        prev1, prev2 = jnp.maximum(i - 1, 0), jnp.maximum(i - 2, 0)

        # UniC: correct the predictor's output with the new denoised. Its order is that of the predictor that
        # made the sample: 1 after the first step, else 2. Nothing to correct at step 0.
        hh = log_sigmas[i] - log_sigmas[prev1]
        hh = jnp.where(i > 0, hh, -1.0)
        phi1, b1, b2 = _phis(hh)
        r1 = (log_sigmas[prev2] - log_sigmas[prev1]) / hh  # (lambda_{i-2} - lambda_{i-1}) / h
        r1 = jnp.where(i > 1, r1, -1.0)
        rho0 = (b1 - b2) / (1.0 - r1)
        rho1 = jnp.where(i > 1, b1 - rho0, 0.5)
        rho0 = jnp.where(i > 1, rho0, 0.0)
        d1 = (state.denoised_2 - state.denoised_1) / r1
        ratio = sigma / sigmas[prev1]
        corrected = (
            ratio * state.x_last - phi1 * state.denoised_1 - phi1 * (rho0 * d1 + rho1 * (denoised - state.denoised_1))
        )
        x = jnp.where(i > 0, corrected, state.x)

        # UniP to sigmas[i + 1]: second order except at the first and the last step (lower_order_final).
        sigma_next = sigmas[i + 1]
        ratio = sigma_next / sigma
        hh = jnp.where(sigma_next > 0, log_sigmas[i + 1] - log_sigmas[i], -1.0)
        phi1 = jnp.where(sigma_next > 0, jnp.expm1(hh), -1.0)
        r1 = (log_sigmas[prev1] - log_sigmas[i]) / hh
        second = (i > 0) & (i < num_steps - 1)
        r1 = jnp.where(second, r1, -1.0)
        d1 = jnp.where(second, (state.denoised_1 - denoised) / r1, 0.0)
        x_next = ratio * x - phi1 * denoised - 0.5 * phi1 * d1
        return state.replace(x=x_next, x_last=x, denoised_1=denoised, denoised_2=state.denoised_1)

    x = x.astype(jnp.float32)
    zeros = jnp.zeros_like(x)
    state = UniPCState(x=x, x_last=x, denoised_1=zeros, denoised_2=zeros)
    return loop.run_steps(step, state, num_steps, options).x


def samplers() -> list[Sampler]:
    """This file's registry entries."""
    return [
        Sampler(
            "unipc",
            sample_unipc,
            unipc_schedule,
            1,
            "UniPCMultistepScheduler (solver_order=2, bh2, predict_x0, lower_order_final)",
        )
    ]
