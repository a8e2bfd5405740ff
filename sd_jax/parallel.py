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


def initialize_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Joins a multi-host run: explicitly from the three flags, or through JAX's own detection (TPU pods, SLURM)
    when none is given and such an environment is present; a single process otherwise. Call before any JAX work."""
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given):
        if not all(given):
            raise ValueError("multi-host needs all of --coordinator_address, --num_processes and --process_id")
        # CPU processes exchange collectives over gloo (harmless where GPUs or TPUs do the work).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return
    import os

    if any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE")):
        jax.distributed.initialize()
