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
eps; `SamplerOptions(prediction_type="v_prediction")` does the same (CompVis' PLMS averages eps, the default here).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import struct

from sd_jax.sampling import loop, schedules
from sd_jax.sampling.denoisers import Denoiser, change_level, check_prediction_type, eps_of_model_output, model_output
from sd_jax.sampling.loop import DEFAULT_OPTIONS, Sampler, SamplerOptions

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
    schedules.check_steps(num_steps, n_train)
    n = num_steps
    calls = n + 1 if n > 1 else 1
    max_steps = max(max_steps or calls, calls)
    train_sigmas = schedules.train_sigmas(config, float32_cumprod=True)  # the twin's float32 alphas_cumprod

    def repeat_second(values):
        return np.concatenate([values[:2], values[1:]]) if n > 1 else values

    if schedule_type != "default":
        levels = schedules.respaced_sigmas(schedule_type, n, train_sigmas[0], train_sigmas[-1])
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

    set_alpha_to_one = config.get("set_alpha_to_one", False)
    timesteps = repeat_second(schedules.spaced_timesteps(s["timestep_spacing"], n_train, n, s["steps_offset"]))
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
    keys: jnp.ndarray | None = None,
    options: SamplerOptions = DEFAULT_OPTIONS,
) -> jnp.ndarray:
    """PLMS, one denoiser call per step (see the module docstring); step i calls the denoiser at sigmas[i].

    Arguments as every sampler's (see `loop`); deterministic (keys are ignored). Reads options.num_steps (= calls),
    sigmas_next (step i moves to sigmas_next[i], then hands its x_t to sigmas[i + 1]), prediction_type (the space
    the outputs are averaged in: "epsilon", or "v_prediction" as diffusers' twin does for v-prediction models),
    python_loop and after_step.
    """
    del keys
    prediction_type = options.prediction_type
    check_prediction_type(prediction_type)
    sigmas_next = options.next_sigmas(sigmas)
    weights = jnp.asarray(_AB)

    def step(i, state: PLMSState) -> PLMSState:
        sigma = sigmas[i]
        out = model_output(state.x, sigma, denoise(state.x, sigma), prediction_type)
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
        eps = eps_of_model_output(start, sigma_start, combined, prediction_type)
        x = start + (sigma_to - sigma_start) * eps
        return state.replace(x=change_level(x, sigma_to, sigmas[i + 1]), outputs=outputs, count=count)

    x = x.astype(jnp.float32)
    state = PLMSState(x=x, first_x=x, outputs=jnp.zeros((4,) + x.shape, jnp.float32), count=jnp.zeros((), jnp.int32))
    return loop.run_steps(step, state, options.steps(sigmas), options).x


def samplers() -> list[Sampler]:
    """This file's registry entries."""
    return [Sampler("plms", sample_plms, plms_schedule, 1, "PNDMScheduler(skip_prk_steps=True)")]
