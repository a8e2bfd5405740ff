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
from sd_jax.sampling.euler import discrete_schedule
from sd_jax.sampling.loop import StepHook

ORDER = 4
# 2-point Gauss-Legendre on [-1, 1]: nodes +-1/sqrt(3), weights 1; exact for polynomials of degree <= 3.
_GAUSS_NODES = (-1.0 / math.sqrt(3.0), 1.0 / math.sqrt(3.0))


def lms_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> schedules.Schedule:
    """The schedule of `LMSDiscreteScheduler.from_config(config)`."""
    return discrete_schedule(config, num_steps, max_steps, schedule_type)


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
    *,
    num_steps: jnp.ndarray | int | None = None,
    keys: jnp.ndarray | None = None,
    python_loop: bool = False,
    after_step: StepHook | None = None,
) -> jnp.ndarray:
    """Fourth-order linear multistep, one denoiser evaluation per step (lower order for the first three steps).

    Args:
      denoise: `(x, sigma) -> x0`.
      x: (B, H, W, C) starting latents at level sigmas[0].
      sigmas: (max_steps + 1,) levels, padded past num_steps.
      num_steps: steps to take (may be traced); defaults to len(sigmas) - 1.
      keys: unused (deterministic).
      python_loop: a plain Python loop for debugging.
      after_step: `(i, x) -> x` applied after each step (see `loop.run_steps`).

    Returns:
      (B, H, W, C) float32 latents at level sigmas[num_steps].
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
    num_steps = sigmas.shape[0] - 1 if num_steps is None else num_steps
    return loop.run_steps(step, state, num_steps, python_loop, after_step).x


def samplers() -> list:
    """This file's samplers, for the registry in samplers.py (imported here to avoid an import cycle)."""
    from sd_jax.sampling.samplers import Sampler

    return [Sampler("lms", sample_lms, lms_schedule, 1, "LMSDiscreteScheduler (order 4)")]
