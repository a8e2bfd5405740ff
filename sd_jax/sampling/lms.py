"""LMS: linear multistep on the probability-flow ODE (k-diffusion's `sample_lms`), order 4.

Twin: diffusers' LMSDiscreteScheduler with its `step(order=4)` default. Step i integrates the Lagrange polynomial
through the last min(i + 1, 4) slopes (at sigmas[i], sigmas[i - 1], ...) over [sigmas[i], sigmas[i + 1]]. The
twin integrates each basis polynomial numerically; their degree is at most 3, so 2-point Gauss-Legendre quadrature
is exact and runs inside the jitted loop on traced sigmas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax.numpy as jnp
from flax import struct

from sd_jax.sampling import loop, schedules
from sd_jax.sampling.denoisers import Denoiser
from sd_jax.sampling.loop import DEFAULT_OPTIONS, Sampler, SamplerOptions

ORDER = 4
# 2-point Gauss-Legendre on [-1, 1]: nodes +-1/sqrt(3), weights 1; exact for polynomials of degree <= 3.
_GAUSS_NODES = (-1.0 / math.sqrt(3.0), 1.0 / math.sqrt(3.0))


def lms_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> schedules.Schedule:
    """The schedule of `LMSDiscreteScheduler.from_config(config)`."""
    return schedules.discrete_schedule(config, num_steps, max_steps, schedule_type)


def lms_coefficients(sigmas: jnp.ndarray, i, order: int = ORDER) -> jnp.ndarray:
    """(order,) weights of the slopes at sigmas[i], sigmas[i - 1], ..., for the step from sigmas[i] to sigmas[i + 1].

    Weight k is the integral over [sigmas[i], sigmas[i + 1]] of the Lagrange basis polynomial that is 1 at
    sigmas[i - k] and 0 at the other nodes. Only the first min(i + 1, order) nodes exist; the other weights are 0.

    Args:
      sigmas: (max_steps + 1,) float32 levels.
      i: the step (may be traced).
      order: the largest number of slopes.
    """
    used = jnp.minimum(i + 1, order)
    nodes = sigmas[jnp.maximum(i - jnp.arange(order), 0)]
    a, b = sigmas[i], sigmas[i + 1]
    taus = [(a + b) / 2 + (b - a) / 2 * g for g in _GAUSS_NODES]
    weights = []
    for k in range(order):
        integral = jnp.zeros((), jnp.float32)
        for tau in taus:
            basis = jnp.ones((), jnp.float32)
            for m in range(order):
                if m != k:
                    factor = (tau - nodes[m]) / (nodes[k] - nodes[m])
                    basis = basis * jnp.where(m < used, factor, 1.0)
            integral = integral + basis
        weights.append(jnp.where(k < used, integral * (b - a) / 2, 0.0))
    return jnp.stack(weights)


@struct.dataclass
class LMSState:
    x: jnp.ndarray  # (B, H, W, C) float32, at level sigmas[i]
    derivatives: jnp.ndarray  # (ORDER, B, H, W, C): slopes at sigmas[i - 1], sigmas[i - 2], ... (newest first)


def sample_lms(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    keys: jnp.ndarray | None = None,
    options: SamplerOptions = DEFAULT_OPTIONS,
) -> jnp.ndarray:
    """Fourth-order linear multistep, one denoiser evaluation per step (lower order for the first three steps).

    Arguments as every sampler's (see `loop`); deterministic (keys are ignored).
    """
    del keys

    def step(i, state: LMSState) -> LMSState:
        sigma = sigmas[i]
        derivative = (state.x - denoise(state.x, sigma)) / sigma
        derivatives = jnp.concatenate([derivative[None], state.derivatives[:-1]])
        coefficients = lms_coefficients(sigmas, i)
        x = state.x + jnp.tensordot(coefficients, derivatives, axes=1)
        return state.replace(x=x, derivatives=derivatives)

    x = x.astype(jnp.float32)
    state = LMSState(x=x, derivatives=jnp.zeros((ORDER, *x.shape), jnp.float32))
    return loop.run_steps(step, state, options.steps(sigmas), options).x


def samplers() -> list[Sampler]:
    """This file's registry entries."""
    return [Sampler("lms", sample_lms, lms_schedule, 1, "LMSDiscreteScheduler (order 4)")]
