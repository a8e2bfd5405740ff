"""What every sampler shares: the step loop (jitted or plain Python) and per-image noise."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp

State = TypeVar("State")
# `(i, x) -> x`: called on a sampler's latents after step i (which moved them to level sigmas[i + 1]).
StepHook = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def run_steps(
    step: Callable[[int, State], State],
    state: State,
    num_steps,
    python_loop: bool = False,
    after_step: StepHook | None = None,
) -> State:
    """Runs `step(i, state)` for i in [0, num_steps): a `lax.fori_loop` (num_steps may be traced: steps are data),
    or a plain Python loop for debugging (num_steps must then be concrete).

    `after_step`, if given, rewrites the state's latents `state.x` after every step, leaving the sampler's other
    state (its history of denoised predictions) alone, as diffusers' inpainting does between scheduler steps: it
    pastes the known region back, noised to the level the step reached.
    """
    if after_step is not None:
        inner = step

        def step(i, state):
            state = inner(i, state)
            return state.replace(x=after_step(i, state.x))

    if python_loop:
        for i in range(int(num_steps)):
            state = step(i, state)
        return state
    return jax.lax.fori_loop(0, num_steps, step, state)


def image_noise(keys: jnp.ndarray, step, shape: tuple[int, ...], salt: int = 0) -> jnp.ndarray:
    """Unit normal noise (B, *shape): image b's from fold_in(fold_in(keys[b], step), salt).

    Keyed per image and per step, so an image's noise does not depend on its batch or device; `salt` separates
    several draws within one step.
    """

    def one(key):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, step), salt), shape, jnp.float32)

    return jax.vmap(one)(keys)
