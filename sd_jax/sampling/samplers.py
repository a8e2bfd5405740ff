"""The sampler registry: each name with its schedule, its loop, its cost per step and its diffusers twin.

Every sampler has the signature of `loop` (`sample(denoise, x, sigmas, keys=None, options=...)`) over a denoiser
`denoise(x, sigma) -> x0`; its family file (ddim, plms, euler, lms, dpm2, dpmpp, unipc) lists its entries, and this
file collects them in the order of `--list_samplers`.
"""

from __future__ import annotations

from collections.abc import Mapping

from sd_jax.sampling import ddim, dpm2, dpmpp, euler, lms, plms, schedules, unipc
from sd_jax.sampling.loop import Sampler, SamplerOptions
from sd_jax.sampling.schedules import SCHEDULE_TYPES

# The order of `--list_samplers`.
ORDER = (
    "ddim",
    "plms",
    "euler",
    "euler_a",
    "heun",
    "lms",
    "dpm2",
    "dpm2_a",
    "dpmpp_2s_a",
    "dpmpp_2m",
    "dpmpp_sde",
    "dpmpp_2m_sde",
    "unipc",
)

_ENTRIES = {entry.name: entry for family in (ddim, plms, euler, lms, dpm2, dpmpp, unipc) for entry in family.samplers()}
if set(_ENTRIES) != set(ORDER):
    raise ImportError(f"sampler entries {sorted(_ENTRIES)} differ from ORDER {sorted(ORDER)}")
SAMPLERS: dict[str, Sampler] = {name: _ENTRIES[name] for name in ORDER}


def check(sampler: str, schedule: str) -> None:
    """Raises a one-line ValueError for an unknown sampler or schedule."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; available: {', '.join(SAMPLERS)}")
    if schedule not in SCHEDULE_TYPES:
        raise ValueError(f"unknown schedule {schedule!r}; available: {', '.join(SCHEDULE_TYPES)}")


def schedule(sampler: str, schedule_type: str, scheduler_config: Mapping, steps: int) -> schedules.Schedule:
    """The schedule a sampler walks for `steps` steps, padded to the training length so steps stay data."""
    check(sampler, schedule_type)
    # One more than the training length: PLMS's twin repeats a timestep, taking steps + 1 model calls.
    max_steps = schedules.scheduler_settings(scheduler_config)["num_train_timesteps"] + 1
    return SAMPLERS[sampler].make_schedule(scheduler_config, steps, max_steps, schedule_type)


def run(sampler: str, denoise, x, sigmas, keys=None, **options):
    """Runs a registered sampler's loop (inside the caller's jit).

    `options` are `SamplerOptions` fields; every sampler takes the same ones and reads those it uses (the
    pipeline's `eta` is DDIM's; the ancestral and SDE samplers keep their own `eta_ancestral`, 1 by default).
    """
    return SAMPLERS[sampler].sample(denoise, x, sigmas, keys, SamplerOptions(**options))
