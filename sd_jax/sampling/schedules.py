"""Noise schedules: the training `alphas_cumprod`, their sigmas, and the per-sampler inference timesteps.

Sigmas are k-diffusion's: `x = x0 + sigma * eps`, with `sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod)`; a
variance-preserving latent `x_t` is `x / sqrt(1 + sigma**2)`. Everything here is host-side numpy, computed once
per call and handed to the jitted loop as data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

# diffusers' scheduler defaults for the keys a Stable Diffusion `scheduler_config.json` may leave out. DDIM's own
# defaults (clip_sample True, set_alpha_to_one True) are those of DDIMScheduler, the twin of our `ddim`.
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "set_alpha_to_one": True,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}

PREDICTION_TYPES = ("epsilon", "v_prediction")


def scheduler_settings(config: Mapping) -> dict:
    """A scheduler config with diffusers' defaults filled in, and what we do not support rejected."""
    settings = {**SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if k in SCHEDULER_DEFAULTS}}
    if settings["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {settings['prediction_type']!r} is not supported; use {PREDICTION_TYPES}")
    if settings["thresholding"]:
        raise ValueError("dynamic thresholding is not supported (scheduler config has thresholding=true)")
    if settings["timestep_spacing"] not in ("leading", "trailing", "linspace"):
        raise ValueError(f"timestep_spacing {settings['timestep_spacing']!r} is not one of leading, trailing, linspace")
    return settings


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(alphas_cumprod) so that the last step has zero signal (Lin et al. 2023, Alg. 1)."""
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    alphas_cumprod = root**2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def alphas_cumprod(config: Mapping) -> np.ndarray:
    """The training schedule's cumulative alphas, (num_train_timesteps,) float64, as diffusers defines them."""
    s = scheduler_settings(config)
    n = s["num_train_timesteps"]
    if s["trained_betas"] is not None:
        betas = np.asarray(s["trained_betas"], dtype=np.float64)
    elif s["beta_schedule"] == "linear":
        betas = np.linspace(s["beta_start"], s["beta_end"], n, dtype=np.float64)
    elif s["beta_schedule"] == "scaled_linear":
        betas = np.linspace(s["beta_start"] ** 0.5, s["beta_end"] ** 0.5, n, dtype=np.float64) ** 2
    elif s["beta_schedule"] == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise ValueError(f"beta_schedule {s['beta_schedule']!r} is not supported")
    # diffusers builds betas in float32; rounding them the same way keeps the schedules bit-close.
    betas = betas.astype(np.float32).astype(np.float64)
    if s["rescale_betas_zero_snr"]:
        betas = _zero_terminal_snr(betas)
    return np.cumprod(1.0 - betas)


def sigmas_from_alphas_cumprod(acp: np.ndarray) -> np.ndarray:
    """k-diffusion sigmas of variance-preserving alphas_cumprod (float64)."""
    return np.sqrt((1.0 - acp) / acp)


def spaced_timesteps(config: Mapping, num_steps: int) -> np.ndarray:
    """Inference timesteps, descending int64 (num_steps,), as diffusers' DDIMScheduler.set_timesteps spaces them."""
    s = scheduler_settings(config)
    n_train = s["num_train_timesteps"]
    if not 1 <= num_steps <= n_train:
        raise ValueError(f"steps must be between 1 and {n_train}, got {num_steps}")
    if s["timestep_spacing"] == "linspace":
        return np.linspace(0, n_train - 1, num_steps).round()[::-1].astype(np.int64)
    if s["timestep_spacing"] == "leading":
        ratio = n_train // num_steps
        return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + s["steps_offset"]
    ratio = n_train / num_steps
    return np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, evenly spaced in sigma**(1/rho) (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, evenly spaced in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def timesteps_of_sigmas(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of sigmas by log-sigma interpolation (diffusers' `_sigma_to_t`), float64."""
    return np.interp(np.log(np.maximum(sigmas, 1e-10)), np.log(train_sigmas), np.arange(len(train_sigmas)))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What one sampling call walks through, padded to a fixed length so that step counts are data.

    Attributes:
      sigmas: (max_steps + 1,) float32; sigmas[i] is the level step i starts from, sigmas[num_steps] where it ends.
      sigmas_next: (max_steps,) float32; the level step i moves to (differs from sigmas[i + 1] only where a
        diffusers twin steps to a level the next step does not start from, e.g. DDIM with linspace spacing).
      timesteps: (max_steps,) float32; the U-Net timestep of sigmas[i].
      num_steps: how many of the entries are used.
      train_sigmas: (num_train_timesteps,) float32; the table that maps a sigma to a timestep.
      final_scale: multiplies the loop's output into the twin's final latents (1 / sqrt(1 + sigma_end**2)).
      init_scale: multiplies unit noise into the loop's starting `x`.
    """

    sigmas: np.ndarray
    sigmas_next: np.ndarray
    timesteps: np.ndarray
    num_steps: int
    train_sigmas: np.ndarray
    init_scale: float
    final_scale: float


def _pad(values: np.ndarray, length: int) -> np.ndarray:
    """Pads with the last value; padded entries are never stepped through."""
    values = np.asarray(values, dtype=np.float32)
    if len(values) >= length:
        return values
    return np.concatenate([values, np.full(length - len(values), values[-1], dtype=np.float32)])


def pad_schedule(
    sigmas: np.ndarray,
    timesteps: np.ndarray,
    train_sigmas: np.ndarray,
    max_steps: int,
    *,
    init_scale: float,
    sigmas_next: np.ndarray | None = None,
) -> Schedule:
    """A Schedule from (n + 1,) sigmas and (n,) timesteps, padded to max_steps; final_scale from sigmas[n]."""
    n = len(sigmas) - 1
    if len(timesteps) != n:
        raise ValueError(f"{len(timesteps)} timesteps for {n} steps")
    sigmas_next = sigmas[1:] if sigmas_next is None else sigmas_next
    return Schedule(
        sigmas=_pad(sigmas, max_steps + 1),
        sigmas_next=_pad(sigmas_next, max_steps),
        timesteps=_pad(np.asarray(timesteps, np.float64), max_steps),
        num_steps=n,
        train_sigmas=np.asarray(train_sigmas, np.float32),
        init_scale=float(init_scale),
        final_scale=float(1.0 / np.sqrt(1.0 + float(sigmas[-1]) ** 2)),
    )


def ddim_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> Schedule:
    """The schedule of diffusers' `DDIMScheduler.from_config(config)` for `num_steps` steps.

    DDIM steps from timestep t to t - num_train_timesteps // num_steps (or to the final alpha: 1 when
    set_alpha_to_one, else alphas_cumprod[0]); with leading spacing that is the next timestep. DDIMScheduler has
    no karras or exponential spacing; for those, DDIM walks the spaced sigmas of the training range down to 0.
    """
    s = scheduler_settings(config)
    max_steps = max(max_steps or num_steps, num_steps)
    acp = alphas_cumprod(config)
    train_sigmas = sigmas_from_alphas_cumprod(acp)
    if schedule_type != "default":
        spaced = {"karras": sigmas_karras, "exponential": sigmas_exponential}[schedule_type]
        sigmas = spaced(num_steps, train_sigmas[0], train_sigmas[-1])
        timesteps = timesteps_of_sigmas(sigmas, train_sigmas)
        sigmas = np.concatenate([sigmas, [0.0]])
        return pad_schedule(sigmas, timesteps, train_sigmas, max_steps, init_scale=np.sqrt(1.0 + sigmas[0] ** 2))
    timesteps = spaced_timesteps(config, num_steps)
    prev = timesteps - s["num_train_timesteps"] // num_steps
    final_acp = 1.0 if s["set_alpha_to_one"] else acp[0]
    acp_next = np.where(prev >= 0, acp[np.clip(prev, 0, None)], final_acp)
    sigmas_next = sigmas_from_alphas_cumprod(acp_next)
    sigmas = np.concatenate([train_sigmas[timesteps], sigmas_next[-1:]])
    return Schedule(
        sigmas=_pad(sigmas, max_steps + 1),
        sigmas_next=_pad(sigmas_next, max_steps),
        timesteps=_pad(timesteps.astype(np.float64), max_steps),
        num_steps=num_steps,
        train_sigmas=train_sigmas.astype(np.float32),
        init_scale=float(np.sqrt(1.0 + sigmas[0] ** 2)),  # DDIM starts from unit-variance x_t
        final_scale=float(1.0 / np.sqrt(1.0 + sigmas[-1] ** 2)),
    )


def img2img_start(steps: int, strength: float) -> int:
    """The step at which img2img enters a `steps`-step schedule, as diffusers' img2img pipelines compute it.

    strength 1 starts at step 0 (all steps run); strength 0 at step `steps` (none run: the image comes back
    through the VAE unchanged by sampling). The Python float product is kept as is, so the rounding matches.
    """
    return steps - min(int(steps * strength), steps)


def enter_schedule(schedule: Schedule, start: int) -> Schedule:
    """The part of a schedule from step `start` on (img2img), padded to the same length (no recompilation).

    `init_scale` becomes the noise level at the entry, sigmas[start]: the loop starts from image latents plus
    that much unit noise. Entering past the last step leaves nothing to run: no noise, no final rescale.
    """
    if not 0 <= start <= schedule.num_steps:
        raise ValueError(f"cannot enter a {schedule.num_steps}-step schedule at step {start}")
    remaining = schedule.num_steps - start

    def shift(values: np.ndarray) -> np.ndarray:
        return _pad(values[start:], len(values))

    return Schedule(
        sigmas=shift(schedule.sigmas),
        sigmas_next=shift(schedule.sigmas_next),
        timesteps=shift(schedule.timesteps),
        num_steps=remaining,
        train_sigmas=schedule.train_sigmas,
        init_scale=float(schedule.sigmas[start]) if remaining else 0.0,
        final_scale=schedule.final_scale if remaining else 1.0,
    )
