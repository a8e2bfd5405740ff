"""The sampler registry: each name with its schedule, its loop, its cost per step and its diffusers twin.

A sampler is a pure function
`sample(denoise, x, sigmas, *, num_steps, keys=None, python_loop=False, after_step=None, **options)`
over a denoiser `denoise(x, sigma) -> x0`. `sigmas` is padded to a fixed length and `num_steps` may be traced, so the
step count is data. `keys` (B,) are per-image PRNG keys for the samplers that draw noise.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping

from sd_jax.sampling import schedules
from sd_jax.sampling.ddim import sample_ddim

SCHEDULE_TYPES = ("default", "karras", "exponential")


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A registered sampler.

    Attributes:
      name: the `sampler=` value.
      sample: the loop (see the module docstring).
      make_schedule: `(scheduler_config, steps, max_steps, schedule_type) -> Schedule`, as the twin computes it.
      calls_per_step: denoiser (U-Net) evaluations per step.
      twin: the diffusers scheduler it matches (with its settings), or what it is compared with.
      stochastic: draws noise (needs keys).
      uses_eta: takes the pipeline's `eta` (DDIM's). Ancestral and SDE samplers keep their own full noise
        (eta 1, as their twins and AUTOMATIC1111 default to).
    """

    name: str
    sample: Callable
    make_schedule: Callable[[Mapping, int, int, str], schedules.Schedule]
    calls_per_step: int
    twin: str
    stochastic: bool = False
    uses_eta: bool = False


SAMPLERS: dict[str, Sampler] = {}


def register(sampler: Sampler) -> Sampler:
    SAMPLERS[sampler.name] = sampler
    return sampler


register(Sampler("ddim", sample_ddim, schedules.ddim_schedule, 1, "DDIMScheduler", stochastic=True, uses_eta=True))


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


def _register_families() -> None:
    from sd_jax.sampling import dpm2, dpmpp, euler, lms, plms, unipc

    found = {s.name: s for module in (plms, euler, lms, dpm2, dpmpp, unipc) for s in module.samplers()}
    for name in ORDER:
        if name in found:
            register(found[name])


_register_families()


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


# Options a sampler may not silently ignore when given (the others are extras that only some samplers use).
_REQUIRED_OPTIONS = ("after_step",)


def run(sampler: str, denoise, x, **kwargs):
    """Runs a registered sampler's loop (inside the caller's jit), passing only the options it takes."""
    spec = SAMPLERS[sampler]
    if not spec.uses_eta:
        kwargs.pop("eta", None)
    accepted = inspect.signature(spec.sample).parameters
    dropped = [k for k, v in kwargs.items() if k not in accepted and k in _REQUIRED_OPTIONS and v is not None]
    if dropped:
        raise TypeError(f"sampler {sampler!r} does not take {', '.join(dropped)}")
    return spec.sample(denoise, x, **{k: v for k, v in kwargs.items() if k in accepted})
