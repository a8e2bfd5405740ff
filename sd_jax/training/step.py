"""The train state, the optimizer, and one jitted `train_step(state, frozen, batch) -> state, metrics`.

Parameters are flat `{component: {"path.to.leaf": array}}` trees in float32 (the master weights); the loss casts
them to the compute dtype. The batch is sharded over the mesh's `data` axis and the weights replicated (or, with
FSDP, each weight split along one axis over the devices): XLA inserts the gradient reduction.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sd_jax.parallel import BATCH_AXIS
from sd_jax.training.options import TrainOptions

# Arrays smaller than this stay replicated under FSDP: splitting them saves nothing and costs collectives.
_FSDP_MIN_SIZE = 1 << 14


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree.

    step: () int32, optimizer steps taken. params / ema: the trained components' flat float32 trees (ema is
    None without EMA). opt_state: the optax state. rng: (2,) uint32 key data; step s uses fold_in(rng, s).
    """

    step: jax.Array
    params: dict
    ema: dict | None
    opt_state: optax.OptState
    rng: jax.Array


def learning_rate_schedule(options: TrainOptions) -> optax.Schedule:
    """Linear warmup from 0, then constant, or cosine decay to 0 at `max_steps`."""
    lr, warmup = options.learning_rate, options.warmup_steps
    if options.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(options.max_steps, warmup + 1), 0.0)
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def make_optimizer(options: TrainOptions) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the run's learning-rate schedule."""
    return optax.chain(
        optax.clip_by_global_norm(options.max_grad_norm),
        optax.adamw(
            learning_rate_schedule(options),
            b1=options.adam_beta1,
            b2=options.adam_beta2,
            eps=options.adam_epsilon,
            weight_decay=options.weight_decay,
        ),
    )


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
    """The EMA decay after `step` optimizer steps: min(decay, (1 + step) / (10 + step)), as diffusers' EMAModel."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def init_state(params: dict, tx: optax.GradientTransformation, *, seed: int, ema: bool) -> TrainState:
    """A fresh state at step 0 (float32 master weights; the EMA starts as a copy of them)."""
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema=jax.tree.map(jnp.copy, params) if ema else None,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def param_spec(shape: tuple[int, ...], devices: int, fsdp: bool) -> PartitionSpec:
    """Replicated, or (FSDP) split along the largest axis the device count divides."""
    if not fsdp or devices == 1 or int(np.prod(shape, dtype=np.int64)) < _FSDP_MIN_SIZE:
        return PartitionSpec()
    axes = sorted(range(len(shape)), key=lambda a: -shape[a])
    for axis in axes:
        if shape[axis] % devices == 0:
            spec = [None] * len(shape)
            spec[axis] = BATCH_AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(abstract_state, mesh: Mesh, fsdp: bool):
    """NamedShardings for every leaf of a (possibly abstract) state: parameters and their optimizer moments."""
    devices = mesh.shape[BATCH_AXIS]
    return jax.tree.map(lambda a: NamedSharding(mesh, param_spec(tuple(a.shape), devices, fsdp)), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are (grad_accum, batch, ...): the batch axis is split over the devices."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXIS))


def make_train_step(
    loss_fn: Callable, tx: optax.GradientTransformation, options: TrainOptions
) -> Callable[[TrainState, dict, dict], tuple[TrainState, dict]]:
    """`train_step(state, frozen, batch)`: gradients of `loss_fn(params, frozen, micro_batch, key)` summed over the
    leading (accumulation) axis of `batch`, one optimizer update, the EMA update. Not jitted (see `Trainer`)."""
    schedule = learning_rate_schedule(options)

    def train_step(state: TrainState, frozen: dict, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        # A Python loop, not lax.scan: XLA:CPU runs convolutions inside a while loop several times slower.
        accum = jax.tree.leaves(batch)[0].shape[0]
        grads, history = None, []
        for index in range(accum):
            micro = jax.tree.map(lambda x, i=index: x[i], batch)
            (_, metrics), g = grad_fn(state.params, frozen, micro, jax.random.fold_in(key, index))
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
            history.append(metrics)
        metrics = jax.tree.map(lambda *m: jnp.stack(m), *history)
        grads = jax.tree.map(lambda g: g / accum, grads)
        metrics = jax.tree.map(jnp.mean, metrics)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats with its int32 step count
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            learning_rate = jnp.asarray(schedule(state.step), jnp.float32)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        ema = state.ema
        if ema is not None:
            decay = ema_decay_at(options.ema_decay, state.step)
            ema = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)
        metrics = metrics | {"grad_norm": optax.tree.norm(grads), "learning_rate": learning_rate}
        return state.replace(step=step, params=params, ema=ema, opt_state=opt_state), metrics

    return train_step


def jit_train_step(train_step, state_sharding, frozen_sharding, mesh: Mesh, *, donate: bool | None = None):
    """The step compiled with the run's shardings; donate: reuse the state's buffers for the new state (default: off
    CPU; the trainer keeps them on CPU, where memory is rarely the limit)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    donate = (0,) if (jax.default_backend() != "cpu" if donate is None else donate) else ()
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, frozen_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, replicated),
        donate_argnums=donate,
    )


__all__ = [
    "TrainState",
    "make_optimizer",
    "learning_rate_schedule",
    "init_state",
    "make_train_step",
    "jit_train_step",
    "state_shardings",
    "batch_sharding",
    "ema_decay_at",
    "param_spec",
]
