"""The sampler registry: each name with its schedule, its loop, its cost per step and its diffusers twin."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from sd_jax.sampling import schedules
from sd_jax.sampling.ddim import sample_ddim

SCHEDULE_TYPES = ("default",)


@dataclasses.dataclass(frozen=True)
class Sampler:
    name: str
    sample: Callable
    make_schedule: Callable[[Mapping, int, int], schedules.Schedule]
    calls_per_step: int
    twin: str


SAMPLERS = {
    "ddim": Sampler("ddim", sample_ddim, schedules.ddim_schedule, 1, "DDIMScheduler"),
}


def check(sampler: str, schedule: str) -> None:
    """Raises a one-line ValueError for an unknown sampler or schedule."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; available: {', '.join(SAMPLERS)}")
    if schedule not in SCHEDULE_TYPES:
        raise ValueError(f"unknown schedule {schedule!r}; available: {', '.join(SCHEDULE_TYPES)}")


def schedule(sampler: str, schedule_type: str, scheduler_config: Mapping, steps: int) -> schedules.Schedule:
    """The schedule a sampler walks for `steps` steps, padded to the training length so steps stay data."""
    check(sampler, schedule_type)
    max_steps = schedules.scheduler_settings(scheduler_config)["num_train_timesteps"]
    return SAMPLERS[sampler].make_schedule(scheduler_config, steps, max_steps)


def run(sampler: str, denoise, x, **kwargs):
    """Runs a registered sampler's loop (inside the caller's jit)."""
    return SAMPLERS[sampler].sample(denoise, x, **kwargs)
