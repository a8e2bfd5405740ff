"""Wrapping a U-Net into a denoiser `denoise(x, sigma) -> x0`, the one thing samplers see.

The U-Net predicts epsilon or v on variance-preserving latents `x_t = x / sqrt(1 + sigma**2)` at an integer-scale
timestep; samplers work in k-diffusion's `x = x0 + sigma * eps`. This file converts between the two: a model into
a denoiser, and for the twins of diffusers' variance-preserving schedulers (DDIM, PNDM), a denoised back into the
model output they step with and a latent from one level's x_t to another's.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from sd_jax.sampling.schedules import PREDICTION_TYPES

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x_t (B,H,W,C), t scalar) -> eps or v
Denoiser = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x (B,H,W,C), sigma scalar) -> x0


def check_prediction_type(prediction_type: str) -> None:
    """Raises a one-line ValueError for a model output other than epsilon or v."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")


def sigma_to_timestep(sigma: jnp.ndarray, train_sigmas: jnp.ndarray) -> jnp.ndarray:
    """The (fractional) training timestep of a sigma, interpolated in log-sigma as diffusers' `_sigma_to_t` does.

    A sigma taken from `train_sigmas` itself maps back to its exact integer timestep (the interpolation's offset
    is exactly zero there), so integer-timestep samplers feed the U-Net the same timesteps as their twins.
    """
    log_table = jnp.log(train_sigmas)
    steps = jnp.arange(train_sigmas.shape[0], dtype=jnp.float32)
    return jnp.interp(jnp.log(sigma), log_table, steps)


def lookup_timestep(
    sigma: jnp.ndarray, train_sigmas: jnp.ndarray, sigmas: jnp.ndarray | None, timesteps: jnp.ndarray | None
) -> jnp.ndarray:
    """The U-Net timestep of `sigma`: the schedule's own timestep where sigma is one of the schedule's sigmas (twins
    such as diffusers' Euler feed fractional timesteps that log-sigma interpolation would not give back exactly),
    else `sigma_to_timestep` (midpoint sigmas of DPM2 and the like, as their twins compute them)."""
    t = sigma_to_timestep(sigma, train_sigmas)
    if sigmas is None:
        return t
    n = timesteps.shape[0]
    hits = sigmas[:n] == sigma
    return jnp.where(jnp.any(hits), timesteps[jnp.argmax(hits)], t)


def vp_denoiser(
    model_fn: ModelFn,
    train_sigmas: jnp.ndarray,
    prediction_type: str,
    *,
    sigmas: jnp.ndarray | None = None,
    timesteps: jnp.ndarray | None = None,
) -> Denoiser:
    """A denoiser from an epsilon- or v-predicting model trained on the variance-preserving schedule.

    Args:
      model_fn: `(x_t, t) -> eps or v`.
      train_sigmas: (num_train_timesteps,) the training sigmas, for sigma -> timestep.
      prediction_type: "epsilon" or "v_prediction".
      sigmas, timesteps: optional schedule table (max_steps + 1,), (max_steps,): the exact timesteps of its sigmas.
    """
    check_prediction_type(prediction_type)

    def denoise(x: jnp.ndarray, sigma: jnp.ndarray) -> jnp.ndarray:
        sigma = jnp.asarray(sigma, jnp.float32)
        scale = jnp.sqrt(sigma**2 + 1.0)
        t = lookup_timestep(sigma, train_sigmas, sigmas, timesteps)
        out = model_fn((x / scale.astype(x.dtype)), t).astype(jnp.float32)
        x = x.astype(jnp.float32)
        if prediction_type == "epsilon":
            return x - sigma * out
        # x0 = alpha * x_t - sqrt(1 - alpha^2) * v, with alpha = 1 / scale and x_t = x / scale.
        return x / scale**2 - out * (sigma / scale)

    return denoise


def model_output(x: jnp.ndarray, sigma: jnp.ndarray, x0: jnp.ndarray, prediction_type: str) -> jnp.ndarray:
    """The model output behind a denoised `x0` of `x` at level sigma: eps = (x - x0) / sigma, or
    v = (alpha^2 x - x0) / (sigma alpha) with alpha = 1 / sqrt(1 + sigma^2)."""
    if prediction_type == "epsilon":
        return (x - x0) / sigma
    return (x / (1.0 + sigma**2) - x0) * jnp.sqrt(1.0 + sigma**2) / sigma


def eps_of_model_output(x: jnp.ndarray, sigma: jnp.ndarray, out: jnp.ndarray, prediction_type: str) -> jnp.ndarray:
    """The eps of a model output `out` (eps or v) for `x` at level sigma."""
    if prediction_type == "epsilon":
        return out
    # eps = alpha v + sigma^vp x^vp, with alpha = 1 / sqrt(1 + sigma^2), x^vp = x / sqrt(1 + sigma^2).
    return out / jnp.sqrt(1.0 + sigma**2) + sigma * x / (1.0 + sigma**2)


def change_level(x: jnp.ndarray, sigma: jnp.ndarray, sigma_target: jnp.ndarray) -> jnp.ndarray:
    """`x` at level sigma rescaled to level sigma_target with the same variance-preserving x_t.

    A twin of a variance-preserving scheduler hands x_t from a step that ended at `sigma` to a step that starts at
    `sigma_target` (usually the same level; not, e.g., for DDIM with linspace spacing).
    """
    return x * (jnp.sqrt(1.0 + sigma_target**2) / jnp.sqrt(1.0 + sigma**2))
