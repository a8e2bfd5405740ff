"""PLMS (Liu et al. 2022, pseudo linear multistep): diffusers' PNDMScheduler(skip_prk_steps=True), k-diffusion form.

The twin's `step_plms` moves a variance-preserving sample from timestep a to timestep b with formula (9) of the
PNDM paper, which equals the DDIM step `x_b = x_a + (sigma_b - sigma_a) eps` on `x = x0 + sigma * eps`, where
eps is an Adams-Bashforth combination of the last model outputs. For n inference steps it makes n + 1 model calls:
its timestep list repeats the second timestep,

    calls:  t[0]      t[1]              t[1]        t[2]   ...  t[n-1]
    step:   Euler     Heun-like (eps_0 + eps_1) / 2 from the *first* sample      AB2, AB3, AB4 ...

so our schedule for `plms` with n steps has n + 1 entries (one call each), and the sampler's step i is the
twin's call i. Only step 1 is special: it averages its output with step 0's and restarts from step 0's sample;
its output is not kept in the history.

The twin combines raw model outputs before turning them into eps, so for a v-prediction model it averages v, not
eps; pass `prediction_type="v_prediction"` to do the same (CompVis' PLMS averages eps, the default here).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import struct

from sd_jax.sampling import schedules
from sd_jax.sampling.denoisers import Denoiser
from sd_jax.sampling.dpmpp import float32_train_sigmas
from sd_jax.sampling.loop import StepHook, run_steps

# Adams-Bashforth weights (newest first) with 1, 2, 3 and 4 outputs in the history.
_AB = np.array(
    [[1, 0, 0, 0], [3 / 2, -1 / 2, 0, 0], [23 / 12, -16 / 12, 5 / 12, 0], [55 / 24, -59 / 24, 37 / 24, -9 / 24]],
    np.float32,
)


def plms_schedule(
    config: Mapping, num_steps: int, max_steps: int | None = None, schedule_type: str = "default"
) -> schedules.Schedule:
    """The schedule of `PNDMScheduler.from_config(config, skip_prk_steps=True)` after `set_timesteps(num_steps)`.

    Returns a Schedule of num_steps + 1 steps (num_steps == 1: one step): sigmas[i] is the level of call i's
    timestep, sigmas_next[i] the level step i moves to (t - num_train_timesteps // num_steps, or the final alpha:
    1 when set_alpha_to_one, else alphas_cumprod[0]). PNDM has no karras / exponential spacing; for those the same
    call pattern walks the spaced sigmas down to 0 (what `max_steps` must allow: num_steps + 1).

    The twin's own defaults apply where the config lacks a key: timestep_spacing "leading", set_alpha_to_one False.
    The twin's second step treats the first sample as if it were at timestep t[1] + num_train_timesteps //
    num_steps; we keep it at t[0]. The two agree for "leading" spacing (the Stable Diffusion setting), where that
    is t[0]; with linspace / trailing spacing, where it need not be, the twin's results differ from ours by up to
    ~2% of the latents.
    """
    s = schedules.scheduler_settings(config)
    n_train = s["num_train_timesteps"]
    if not 1 <= num_steps <= n_train:
        raise ValueError(f"steps must be between 1 and {n_train}, got {num_steps}")
    n = num_steps
    calls = n + 1 if n > 1 else 1
    max_steps = max(max_steps or calls, calls)
    train_sigmas = float32_train_sigmas(config)  # the twin's float32 alphas_cumprod

    def repeat_second(values):
        return np.concatenate([values[:2], values[1:]]) if n > 1 else values

    if schedule_type != "default":
        spaced = {"karras": schedules.sigmas_karras, "exponential": schedules.sigmas_exponential}[schedule_type]
        levels = spaced(n, train_sigmas[0], train_sigmas[-1])
        sigmas = repeat_second(levels)
        sigmas_next = np.concatenate([sigmas[1:], [0.0]])
        timesteps = schedules.timesteps_of_sigmas(sigmas, train_sigmas)
        return schedules.pad_schedule(
            np.concatenate([sigmas, [0.0]]),
            timesteps,
            train_sigmas,
            max_steps,
            init_scale=float(np.sqrt(1.0 + sigmas[0] ** 2)),
            sigmas_next=sigmas_next,
        )

    spacing = config.get("timestep_spacing", "leading")
    set_alpha_to_one = config.get("set_alpha_to_one", False)
    if spacing == "linspace":
        ascending = np.linspace(0, n_train - 1, n).round().astype(np.int64)
    elif spacing == "leading":
        ascending = (np.arange(n) * (n_train // n)).round().astype(np.int64) + s["steps_offset"]
    elif spacing == "trailing":
        ascending = np.round(np.arange(n_train, 0, -n_train / n))[::-1].astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not one of leading, trailing, linspace")
    timesteps = repeat_second(ascending[::-1])
    targets = timesteps - n_train // n
    if n > 1:
        targets[1] = timesteps[1]  # the Heun-like second call lands on its own timestep
    final_sigma = 0.0 if set_alpha_to_one else train_sigmas[0]
    sigmas_next = np.where(targets >= 0, train_sigmas[np.clip(targets, 0, None)], final_sigma)
    sigmas = np.concatenate([train_sigmas[timesteps], sigmas_next[-1:]])
    return schedules.pad_schedule(
        sigmas,
        timesteps,
        train_sigmas,
        max_steps,
        init_scale=float(np.sqrt(1.0 + sigmas[0] ** 2)),  # PNDM starts from unit-variance x_t
        sigmas_next=sigmas_next,
    )


@struct.dataclass
class PLMSState:
    x: jnp.ndarray  # (B, H, W, C) at level sigmas[i]
    first_x: jnp.ndarray  # step 0's starting sample (level sigmas[0]), where step 1 restarts from
    outputs: jnp.ndarray  # (4, B, H, W, C) the kept model outputs (eps or v), newest first
    count: jnp.ndarray  # () int32: how many of `outputs` are filled


def sample_plms(
    denoise: Denoiser,
    x: jnp.ndarray,
    sigmas: jnp.ndarray,
    *,
    sigmas_next: jnp.ndarray | None = None,
    num_steps: jnp.ndarray | int | None = None,
    keys: jnp.ndarray | None = None,
    prediction_type: str = "epsilon",
    python_loop: bool = False,
    after_step: StepHook | None = None,
) -> jnp.ndarray:
    """PLMS from `x` (B, H, W, C) at sigmas[0] to sigmas[num_steps], one call per step (see the module docstring).

    Args:
      denoise: `(x, sigma) -> x0`.
      x: starting latents, already scaled to sigmas[0].
      sigmas: (max_steps + 1,) call levels; step i calls the denoiser at sigmas[i].
      sigmas_next: (max_steps,) the level step i moves to; defaults to sigmas[1:].
      num_steps: steps (= calls) to take, data (may be traced); defaults to len(sigmas) - 1.
      keys: unused (deterministic).
      prediction_type: the space the outputs are averaged in: "epsilon", or "v_prediction" as diffusers' twin
        does for v-prediction models.
      python_loop: plain Python loop for debugging.
      after_step: `(i, x) -> x` applied after each step (see `loop.run_steps`).
    """
    del keys
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    if sigmas_next is None:
        sigmas_next = sigmas[1:]
    if num_steps is None:
        num_steps = sigmas.shape[0] - 1
    weights = jnp.asarray(_AB)

    def to_output(x, sigma, x0):
        """The model output behind a denoised: eps, or v = (alpha^2 x - x0) / (sigma alpha) on x = x0 + sigma eps."""
        if prediction_type == "epsilon":
            return (x - x0) / sigma
        return (x / (1.0 + sigma**2) - x0) * jnp.sqrt(1.0 + sigma**2) / sigma

    def to_eps(x, sigma, out):
        if prediction_type == "epsilon":
            return out
        # eps = alpha v + sigma^vp x^vp, with alpha = 1 / sqrt(1 + sigma^2), x^vp = x / sqrt(1 + sigma^2).
        return out / jnp.sqrt(1.0 + sigma**2) + sigma * x / (1.0 + sigma**2)

    def step(i, state: PLMSState) -> PLMSState:
        sigma = sigmas[i]
        out = to_output(state.x, sigma, denoise(state.x, sigma))
        restart = i == 1
        pushed = jnp.concatenate([out[None], state.outputs[:-1]])
        outputs = jnp.where(restart, state.outputs, pushed)
        count = jnp.where(restart, state.count, jnp.minimum(state.count + 1, 4))
        w = weights[count - 1].reshape((4,) + (1,) * out.ndim)
        combined = jnp.where(restart, 0.5 * (out + state.outputs[0]), jnp.sum(w * outputs, axis=0))
        # Step 1 restarts from step 0's sample, at level sigmas[0].
        start = jnp.where(restart, state.first_x, state.x)
        sigma_start = jnp.where(restart, sigmas[0], sigma)
        sigma_to = sigmas_next[i]
        eps = to_eps(start, sigma_start, combined)
        x = start + (sigma_to - sigma_start) * eps
        # Hand the next call the same x^vp at its own level (usually sigma_to itself).
        x = x * (jnp.sqrt(1.0 + sigmas[i + 1] ** 2) / jnp.sqrt(1.0 + sigma_to**2))
        return state.replace(x=x, outputs=outputs, count=count)

    x = x.astype(jnp.float32)
    state = PLMSState(x=x, first_x=x, outputs=jnp.zeros((4,) + x.shape, jnp.float32), count=jnp.zeros((), jnp.int32))
    return run_steps(step, state, num_steps, python_loop, after_step).x


def samplers() -> list:
    """The registry entries of this file."""
    from sd_jax.sampling.samplers import Sampler

    return [Sampler("plms", sample_plms, plms_schedule, 1, "PNDMScheduler(skip_prk_steps=True)")]
