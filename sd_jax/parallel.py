"""The device mesh: generation shards its batch over every local device; weights are replicated."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "data"


def batch_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named `data` over the given devices (default: every local device)."""
    devices = list(devices) if devices is not None else jax.local_devices()
    # Auto axes: XLA propagates the batch sharding through the model; nothing inside needs sharding annotations.
    return jax.make_mesh((len(devices),), (BATCH_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Splits the leading (batch) axis over the mesh."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (weights, schedules, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def padded_batch_size(batch: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that holds `batch` items."""
    return -(-batch // multiple) * multiple


def pad_batch(array: np.ndarray, size: int) -> np.ndarray:
    """Pads the leading axis to `size` by repeating the last item (padded results are dropped)."""
    if array.shape[0] == size:
        return array
    extra = np.repeat(array[-1:], size - array.shape[0], axis=0)
    return np.concatenate([array, extra], axis=0)
