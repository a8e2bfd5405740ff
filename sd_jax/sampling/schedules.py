"""Noise schedules: the training `alphas_cumprod` and their sigmas, how inference steps are spaced over them, and the
per-step levels every sampler walks (with the ancestral split of a step's noise).

Sigmas are k-diffusion's: `x = x0 + sigma * eps`, with `sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod)`; a
variance-preserving latent `x_t` is `x / sqrt(1 + sigma**2)`. Schedules are host-side numpy, computed once per call
and handed to the jitted loop as data; only `ancestral_step` runs inside the loop.

Whole-schedule builders live here where several samplers use them: `discrete_schedule` (diffusers' Euler-type
twins: euler, euler_a, heun, lms, dpm2, dpm2_a and the k-style DPM++ samplers) and `multistep_schedule` (the
DPM-Solver++ multistep and UniPC twins); each family file wraps them with its own twin's settings. `ddim_schedule`
is here too; PLMS's lives in plms.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax.numpy as jnp
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
SPACINGS = ("leading", "trailing", "linspace")
# "default" is each twin's own spacing of the training sigmas; the others respace n sigmas between two ends.
SCHEDULE_TYPES = ("default", "karras", "exponential")

# The defaults of diffusers' Euler-type schedulers for keys a scheduler config may leave out; they differ from
# DDIM's (no leading spacing) and between twins (Heun and KDPM2 default to SD's betas).
EULER_DEFAULTS = {"timestep_spacing": "linspace", "beta_start": 0.0001, "beta_end": 0.02}
SD_BETA_DEFAULTS = {"timestep_spacing": "linspace", "beta_start": 0.00085, "beta_end": 0.012}


def scheduler_settings(config: Mapping) -> dict:
    """A scheduler config with diffusers' defaults filled in, and what we do not support rejected."""
    settings = {**SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if k in SCHEDULER_DEFAULTS}}
    if settings["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {settings['prediction_type']!r} is not supported; use {PREDICTION_TYPES}")
    if settings["thresholding"]:
        raise ValueError("dynamic thresholding is not supported (scheduler config has thresholding=true)")
    if settings["timestep_spacing"] not in SPACINGS:
        raise ValueError(f"timestep_spacing {settings['timestep_spacing']!r} is not one of {', '.join(SPACINGS)}")
    return settings


def check_steps(num_steps: int, num_train_timesteps: int) -> None:
    """Raises a one-line ValueError unless 1 <= num_steps <= num_train_timesteps."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {num_train_timesteps}, got {num_steps}")


# ---------------------------------------------------------------------------------------------------------------
# The training schedule
# ---------------------------------------------------------------------------------------------------------------


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


def train_sigmas(config: Mapping, *, float32_cumprod: bool = False) -> np.ndarray:
    """The training schedule's sigmas, (num_train_timesteps,) float64, the table that maps sigmas to timesteps.

    Args:
      config: a diffusers scheduler config.
      float32_cumprod: accumulate alphas_cumprod in float32, as diffusers' multistep and PNDM schedulers do. At the
        smallest sigmas float32's `1 - alphas_cumprod` is off by up to 1e-4 relative; those twins build their
        schedules (karras ends, spaced sigmas) from such values, so their twins here do too.
    """
    acp = alphas_cumprod(config)
    if not float32_cumprod:
        return sigmas_from_alphas_cumprod(acp)
    alphas = np.concatenate([acp[:1], acp[1:] / acp[:-1]]).astype(np.float32)
    acp32 = np.cumprod(alphas, dtype=np.float32)
    return np.sqrt((np.float32(1.0) - acp32) / acp32).astype(np.float64)


# ---------------------------------------------------------------------------------------------------------------
# Inference levels
# ---------------------------------------------------------------------------------------------------------------


def spaced_timesteps(
    spacing: str, num_train_timesteps: int, num_steps: int, steps_offset: int = 0, *, rounded: bool = True
) -> np.ndarray:
    """num_steps descending training timesteps, spaced as diffusers' schedulers space them.

    "linspace" spreads them evenly over [0, num_train_timesteps - 1] (fractional unless rounded); "leading" steps by
    num_train_timesteps // num_steps up from steps_offset; "trailing" steps down from the last training timestep.

    Args:
      spacing: one of SPACINGS.
      num_train_timesteps: the training schedule's length.
      num_steps: how many timesteps (not checked against the training length: some twins space one more point).
      steps_offset: added to "leading" timesteps.
      rounded: int64 timesteps (the DDIM, PNDM and multistep twins); else float64, as the Euler-type twins keep them.
    """
    n_train = num_train_timesteps
    if spacing == "linspace":
        timesteps = np.linspace(0, n_train - 1, num_steps)[::-1]
    elif spacing == "leading":
        timesteps = (np.arange(num_steps) * (n_train // num_steps)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        timesteps = np.round(np.arange(n_train, 0, -n_train / num_steps)) - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
    return timesteps.round().astype(np.int64) if rounded else timesteps


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, evenly spaced in sigma**(1/rho) (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, evenly spaced in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def respaced_sigmas(schedule_type: str, n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, spaced as schedule_type ("karras" or "exponential") says."""
    if schedule_type == "karras":
        return sigmas_karras(n, sigma_min, sigma_max)
    if schedule_type == "exponential":
        return sigmas_exponential(n, sigma_min, sigma_max)
    raise ValueError(f"unknown schedule type {schedule_type!r}")


def timesteps_of_sigmas(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of sigmas by log-sigma interpolation (diffusers' `_sigma_to_t`), float64."""
    return np.interp(np.log(np.maximum(sigmas, 1e-10)), np.log(train_sigmas), np.arange(len(train_sigmas)))


def ancestral_step(sigma: jnp.ndarray, sigma_next: jnp.ndarray, eta: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sigma_up, sigma_down) of an ancestral step from sigma to sigma_next (k-diffusion's `get_ancestral_step`).

    The step goes deterministically to sigma_down, then adds fresh noise of std sigma_up, so that
    sigma_down^2 + sigma_up^2 = sigma_next^2. eta = 1 is the twins' step (DDPM-like); eta = 0 makes it
    deterministic (sigma_up 0, sigma_down sigma_next). Runs inside the jitted loop on traced sigmas.
    """
    full = jnp.sqrt(jnp.maximum(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0))
    sigma_up = jnp.minimum(sigma_next, eta * full)
    sigma_down = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0))
    return sigma_up, sigma_down


# ---------------------------------------------------------------------------------------------------------------
# Schedules: what one sampling call walks through
# ---------------------------------------------------------------------------------------------------------------


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
    n_train = s["num_train_timesteps"]
    check_steps(num_steps, n_train)
    max_steps = max(max_steps or num_steps, num_steps)
    acp = alphas_cumprod(config)
    train = sigmas_from_alphas_cumprod(acp)
    if schedule_type != "default":
        sigmas = respaced_sigmas(schedule_type, num_steps, train[0], train[-1])
        timesteps = timesteps_of_sigmas(sigmas, train)
        sigmas = np.concatenate([sigmas, [0.0]])
        return pad_schedule(sigmas, timesteps, train, max_steps, init_scale=np.sqrt(1.0 + sigmas[0] ** 2))
    timesteps = spaced_timesteps(s["timestep_spacing"], n_train, num_steps, s["steps_offset"])
    prev = timesteps - n_train // num_steps
    final_acp = 1.0 if s["set_alpha_to_one"] else acp[0]
    acp_next = np.where(prev >= 0, acp[np.clip(prev, 0, None)], final_acp)
    sigmas_next = sigmas_from_alphas_cumprod(acp_next)
    sigmas = np.concatenate([train[timesteps], sigmas_next[-1:]])
    return Schedule(
        sigmas=_pad(sigmas, max_steps + 1),
        sigmas_next=_pad(sigmas_next, max_steps),
        timesteps=_pad(timesteps.astype(np.float64), max_steps),
        num_steps=num_steps,
        train_sigmas=train.astype(np.float32),
        init_scale=float(np.sqrt(1.0 + sigmas[0] ** 2)),  # DDIM starts from unit-variance x_t
        final_scale=float(1.0 / np.sqrt(1.0 + sigmas[-1] ** 2)),
    )


def discrete_schedule(
    config: Mapping,
    num_steps: int,
    max_steps: int | None,
    schedule_type: str,
    *,
    twin_defaults: Mapping = EULER_DEFAULTS,
    round_karras_timesteps: bool = False,
    euler_options: bool = False,
) -> Schedule:
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
    s = scheduler_settings(config)
    if config.get("interpolation_type", "linear") != "linear":
        raise ValueError(f"interpolation_type {config['interpolation_type']!r} is not supported; use 'linear'")
    if config.get("timestep_type", "discrete") != "discrete":
        raise ValueError(f"timestep_type {config['timestep_type']!r} is not supported; use 'discrete'")
    if schedule_type == "default":
        if config.get("use_karras_sigmas"):
            schedule_type = "karras"
        elif config.get("use_exponential_sigmas"):
            schedule_type = "exponential"
    if schedule_type not in SCHEDULE_TYPES:
        raise ValueError(f"unknown schedule type {schedule_type!r}")
    n_train = s["num_train_timesteps"]
    check_steps(num_steps, n_train)
    max_steps = max(max_steps or num_steps, num_steps)

    train = train_sigmas(config)
    spaced = spaced_timesteps(s["timestep_spacing"], n_train, num_steps, s["steps_offset"], rounded=False)
    timesteps = spaced.astype(np.float32)
    sigmas = np.interp(timesteps.astype(np.float64), np.arange(n_train), train)
    if schedule_type != "default":
        lo, hi = sigmas[-1], sigmas[0]
        if euler_options:
            lo = config["sigma_min"] if config.get("sigma_min") is not None else lo
            hi = config["sigma_max"] if config.get("sigma_max") is not None else hi
        sigmas = respaced_sigmas(schedule_type, num_steps, lo, hi)
        timesteps = timesteps_of_sigmas(sigmas, train)
        if schedule_type == "karras" and round_karras_timesteps:
            timesteps = np.round(timesteps)
    final_sigmas_type = config.get("final_sigmas_type", "zero") if euler_options else "zero"
    if final_sigmas_type not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type {final_sigmas_type!r} is not one of zero, sigma_min")
    final_sigma = train[0] if final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [final_sigma]]).astype(np.float32)
    sigma_max = float(sigmas.max())
    # The twins start from noise of std sigma_max, but sqrt(sigma_max^2 + 1) with leading spacing.
    init_scale = sigma_max if s["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(sigma_max**2 + 1.0)
    schedule = pad_schedule(sigmas, timesteps, train, max_steps, init_scale=init_scale)
    # The twin returns x at the final sigma as it is (no rescaling), also when that sigma is sigma_min.
    return dataclasses.replace(schedule, final_scale=1.0)


def multistep_schedule(
    config: Mapping,
    num_steps: int,
    max_steps: int | None = None,
    schedule_type: str = "default",
    *,
    twin: str = "dpmsolver",
) -> Schedule:
    """The schedule of `DPMSolverMultistepScheduler.from_config(config)` (twin="dpmsolver") or
    `UniPCMultistepScheduler.from_config(config)` (twin="unipc"), which space timesteps the same way, after
    `set_timesteps(num_steps)`; karras / exponential are the twin with use_karras_sigmas / use_exponential_sigmas.

    The twin's own defaults apply where the config lacks a key: timestep_spacing "linspace", final_sigmas_type
    "zero" (the last step goes to sigma 0).
    """
    s = scheduler_settings(config)
    n_train = s["num_train_timesteps"]
    check_steps(num_steps, n_train)
    max_steps = max(max_steps or num_steps, num_steps)
    spacing = config.get("timestep_spacing", "linspace")
    train = train_sigmas(config, float32_cumprod=True)
    n = num_steps
    # "last_timestep" is n_train (no lambda_min clipping). linspace and leading space n + 1 points and drop the last.
    if spacing == "trailing":
        timesteps = spaced_timesteps(spacing, n_train, n, s["steps_offset"])
    else:
        timesteps = spaced_timesteps(spacing, n_train, n + 1, s["steps_offset"])[:-1]
    if schedule_type == "default":
        sigmas = train[timesteps]
    else:
        sigmas = respaced_sigmas(schedule_type, n, float(train[0]), float(train[-1]))
        timesteps = timesteps_of_sigmas(sigmas, train)
        # Both twins round karras timesteps (DPMSolver not for the cosine schedule) and truncate the others.
        if schedule_type == "karras" and (twin == "unipc" or s["beta_schedule"] != "squaredcos_cap_v2"):
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)
    final_type = config.get("final_sigmas_type", "zero")
    if final_type not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type {final_type!r} is not one of zero, sigma_min")
    last = 0.0 if final_type == "zero" else train[0]
    if schedule_type != "default" and final_type == "sigma_min" and twin == "unipc":
        last = sigmas[-1]  # UniPC ends karras / exponential schedules at their own smallest sigma
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return pad_schedule(sigmas, timesteps, train, max_steps, init_scale=float(np.sqrt(1.0 + float(sigmas[0]) ** 2)))


# ---------------------------------------------------------------------------------------------------------------
# img2img: entering a schedule part-way
# ---------------------------------------------------------------------------------------------------------------


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
