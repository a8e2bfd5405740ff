"""What every sampler shares: its signature and options, its registry entry, the step loop (jitted or plain
Python) and per-image noise.

Every sampler is `sample(denoise, x, sigmas, keys=None, options=DEFAULT_OPTIONS) -> x` over a denoiser
`denoise(x, sigma) -> x0`:

- x: (B, H, W, C) starting latents at level sigmas[0], already scaled to it.
- sigmas: (max_steps + 1,) levels, padded past the steps taken, so that the step count is data.
- keys: (B,) per-image PRNG keys, for the samplers that draw noise (`image_noise`); the others ignore them.
- options: a `SamplerOptions`; each sampler reads the fields it uses and ignores the others.

It returns (B, H, W, C) float32 latents at level sigmas[num_steps].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import struct

from sd_jax.sampling.schedules import Schedule

State = TypeVar("State")
# `(i, x) -> x`: called on a sampler's latents after step i (which moved them to level sigmas[i + 1]).
StepHook = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


@struct.dataclass
class SamplerOptions:
    """How a sampler walks its schedule: one object for every sampler, each reading the fields it uses.

    The numeric fields may be traced (data: changing them does not recompile); the others shape the program.

    Attributes:
      num_steps: steps to take; None takes every step of `sigmas` (len(sigmas) - 1).
      sigmas_next: (max_steps,) the level step i moves to, where a twin steps to a level the next step does not
        start from (`ddim`, `plms`; see `schedules.Schedule`); None is sigmas[1:].
      eta: DDIM's eta (Song et al. 2020): 0 is deterministic DDIM, 1 DDPM-like ancestral sampling (`ddim` only).
      eta_ancestral: the share of each step's noise that is fresh, for the ancestral and SDE samplers: 1 is their
        twins (and AUTOMATIC1111's default), 0 makes them deterministic.
      s_noise: scales the fresh noise of the ancestral and SDE samplers.
      clip_x0: `ddim` clamps its predicted x0 to [-clip_x0, clip_x0] (its twin's clip_sample), or None. The
        twin keeps the unclamped prediction's noise, so this is a step option, not a denoiser's.
      prediction_type: the model output space `plms` combines its history in: "epsilon", or "v_prediction" as its
        twin does for a v-prediction model (averaging v is not averaging eps, so no denoiser can stand in for it).
      python_loop: a plain Python loop for debugging instead of `lax.fori_loop` (num_steps must be concrete).
      after_step: `(i, x) -> x` applied after each step (see `run_steps`).
    """

    num_steps: jnp.ndarray | int | None = None
    sigmas_next: jnp.ndarray | None = None
    eta: jnp.ndarray | float = 0.0
    eta_ancestral: jnp.ndarray | float = 1.0
    s_noise: jnp.ndarray | float = 1.0
    clip_x0: float | None = struct.field(pytree_node=False, default=None)
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    python_loop: bool = struct.field(pytree_node=False, default=False)
    after_step: StepHook | None = struct.field(pytree_node=False, default=None)

    def steps(self, sigmas: jnp.ndarray) -> jnp.ndarray | int:
        """num_steps, or every step of `sigmas`."""
        return sigmas.shape[0] - 1 if self.num_steps is None else self.num_steps

    def next_sigmas(self, sigmas: jnp.ndarray) -> jnp.ndarray:
        """sigmas_next, or sigmas[1:]."""
        return sigmas[1:] if self.sigmas_next is None else self.sigmas_next


DEFAULT_OPTIONS = SamplerOptions()


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
    """

    name: str
    sample: Callable
    make_schedule: Callable[[Mapping, int, int, str], Schedule]
    calls_per_step: int
    twin: str
    stochastic: bool = False


@struct.dataclass
class LatentsState:
    """The loop state of a sampler that keeps nothing but its latents."""

    x: jnp.ndarray  # (B, H, W, C) float32, at level sigmas[i]


def run_steps(step: Callable[[int, State], State], state: State, num_steps, options: SamplerOptions) -> State:
    """Runs `step(i, state)` for i in [0, num_steps): a `lax.fori_loop` (num_steps may be traced: steps are data),
    or with `options.python_loop` a plain Python loop for debugging (num_steps must then be concrete).

    `options.after_step`, if given, rewrites the state's latents `state.x` after every step, leaving the sampler's
    other state (its history of denoised predictions) alone, as diffusers' inpainting does between scheduler steps:
    it pastes the known region back, noised to the level the step reached.
    """
    after_step = options.after_step
    if after_step is not None:
        inner = step

        def step(i, state):
            state = inner(i, state)
            return state.replace(x=after_step(i, state.x))

    if options.python_loop:
        for i in range(int(num_steps)):
            state = step(i, state)
        return state
    return jax.lax.fori_loop(0, num_steps, step, state)


def require_keys(keys: jnp.ndarray | None, sampler: str) -> None:
    """Raises a one-line ValueError when a sampler that draws noise is given no keys."""
    if keys is None:
        raise ValueError(f"{sampler} draws noise: pass keys (one PRNG key per image)")


def image_noise(keys: jnp.ndarray, step, shape: tuple[int, ...], salt: int = 0) -> jnp.ndarray:
    """Unit normal noise (B, *shape): image b's from fold_in(fold_in(keys[b], step), salt).

    Keyed per image and per step, so an image's noise does not depend on its batch or device; `salt` separates
    several draws within one step.
    """

    def one(key):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, step), salt), shape, jnp.float32)

    return jax.vmap(one)(keys)
