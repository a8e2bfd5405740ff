"""Saving and resuming a run with orbax-checkpoint's `CheckpointManager`.

Each checkpoint is a folder `output_dir/checkpoints/<step>/` that orbax writes under a temporary name and commits
atomically: a run killed at any moment leaves the previous checkpoints intact, and the same command resumes from
the latest committed one. It holds the parameters, the EMA, the optimizer state, the step and the RNG (the state
pytree), and as JSON the data position and the options that shaped the run.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from sd_jax.training.step import TrainState


def _to_tree(state: TrainState) -> dict:
    """The state as nested string-keyed dicts (the optimizer state's leaves numbered in tree order)."""
    tree = {
        "step": state.step,
        "rng": state.rng,
        "params": state.params,
        "opt_state": {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(state.opt_state))},
    }
    if state.ema is not None:
        tree["ema"] = state.ema
    return tree


def _from_tree(tree: dict, like: TrainState) -> TrainState:
    opt_leaves = [tree["opt_state"][str(i)] for i in range(len(tree["opt_state"]))]
    return TrainState(
        step=tree["step"],
        rng=tree["rng"],
        params=tree["params"],
        ema=tree.get("ema"),
        opt_state=jax.tree.unflatten(jax.tree.structure(like.opt_state), opt_leaves),
    )


class Checkpoints:
    """The run's checkpoints: `latest_step()`, `save(state, meta)`, `restore(step, abstract_state)`."""

    def __init__(self, directory: str | Path, *, keep: int):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, meta: dict) -> None:
        step = int(jax.device_get(state.step))
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(_to_tree(state)), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: TrainState, shardings: TrainState) -> tuple[TrainState, dict]:
        """The state at `step`, placed with `shardings`, and its JSON metadata."""
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            _to_tree(abstract_state),
            _to_tree(shardings),
        )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
        return _from_tree(restored["state"], abstract_state), restored["meta"]

    def close(self) -> None:
        self.manager.close()
