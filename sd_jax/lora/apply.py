"""LoRAs as data: checked against a model, then added to its weights outside any compiled program.

    W' = W + sum_i weight_i * (alpha_i / rank_i) * up_i @ down_i

per Linear / Conv kernel, summed in float32 and cast back to the kernel's dtype (float32, bfloat16 or float16). Each
new kernel keeps the sharding of the one it replaces, so the compiled generation program sees arrays of the same
shapes, dtypes and shardings and never compiles again: switching LoRAs or weights is data.

    lora = read_lora("detail.safetensors")
    pipe.states = apply_loras(base, [ActiveLoRA(lora, te_weight=0.8, unet_weight=0.6)])
    pipe.states = apply_loras(base, [])  # the base model again, the very same arrays

The base states are never modified. scale * up @ down is computed once per file and module (on the host, float32,
kept in `LoRAFile.deltas`); a new weight only rescales and re-adds it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sd_jax.convert.params import path_to_name, torch_to_flax_layout
from sd_jax.lora.files import LoRAError, LoRAFile, LoRAModule
from sd_jax.lora.keys import COMPONENTS, ModuleTable, module_table


@dataclasses.dataclass(frozen=True)
class ActiveLoRA:
    """A LoRA file with its weights, as AUTOMATIC1111's `<lora:name:te_weight:unet_weight>`.

    `apply_loras` also takes a bare `LoRAFile` (weight 1), `(lora, weight)` and `(lora, te_weight, unet_weight)`.

    Attributes:
      lora: the file (`read_lora`).
      te_weight: the multiplier of its text-encoder modules.
      unet_weight: the multiplier of its U-Net modules; None: the same as `te_weight` (`<lora:name:w>`).
    """

    lora: LoRAFile
    te_weight: float = 1.0
    unet_weight: float | None = None

    def weight(self, component: str) -> float:
        """The multiplier of one component's modules."""
        if component == "text_encoder" or self.unet_weight is None:
            return float(self.te_weight)
        return float(self.unet_weight)


def as_active(entry) -> ActiveLoRA:
    """An `ActiveLoRA` from any of the forms `apply_loras` takes."""
    if isinstance(entry, ActiveLoRA):
        active = entry
    elif isinstance(entry, LoRAFile):
        active = ActiveLoRA(entry)
    elif isinstance(entry, tuple) and len(entry) in (2, 3) and isinstance(entry[0], LoRAFile):
        active = ActiveLoRA(*entry)
    else:
        raise TypeError(f"expected a LoRAFile, an ActiveLoRA or (lora, te_weight[, unet_weight]), got {entry!r}")
    for weight in (active.te_weight, active.unet_weight):
        if weight is not None and not (isinstance(weight, numbers.Real) and math.isfinite(weight)):
            raise ValueError(f"{active.lora.path}: LoRA weights must be finite numbers, got {weight!r}")
    return active


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one pair of a file goes: a component's module path and the shape of its kernel (NNX layout)."""

    component: str
    path: tuple
    kernel_shape: tuple[int, ...]
    module: LoRAModule


def _fits(module: LoRAModule, kernel_shape: tuple[int, ...]) -> bool:
    """Whether a pair updates a kernel of this shape ((in, out) or (kh, kw, in, out)); a Linear pair fits a 1x1
    convolution and a 1x1 pair a Linear layer (SD 1.x's proj_in / proj_out are convolutions, SD 2.x's Linear)."""
    spatial, fan_in, fan_out = kernel_shape[:-2], kernel_shape[-2], kernel_shape[-1]
    down_spatial = module.down.shape[2:]
    pointwise = ((), (1, 1))
    same_window = down_spatial == spatial or (down_spatial in pointwise and spatial in pointwise)
    return module.up.shape[0] == fan_out and module.down.shape[1] == fan_in and same_window


def _tables(states: Mapping[str, nnx.State], components: set[str]) -> dict[str, ModuleTable]:
    return {c: module_table(c, states[c]) for c in COMPONENTS if c in components and c in states}


def _resolve(lora: LoRAFile, tables: Mapping[str, ModuleTable]) -> list[Target]:
    """Each pair's target in the model; raises a one-line LoRAError for the first pair that has none or misfits."""
    targets: list[Target] = []
    taken: dict[tuple, str] = {}
    unknown: list[LoRAModule] = []
    for module in lora.modules:
        table = tables.get(module.component)
        if table is None:
            raise LoRAError(f"{lora.path}: {module.key} is for a {module.component}, which this model lacks")
        path = table.find(module.component, module.name, module.kohya)
        if path is None:
            unknown.append(module)
            continue
        where = (module.component, path)
        if where in taken:
            raise LoRAError(f"{lora.path}: {module.key} and {taken[where]} both update {path_to_name(path)}")
        taken[where] = module.key
        targets.append(Target(module.component, path, table.kernels[path], module))
    if unknown:
        first = unknown[0]
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise LoRAError(
            f"{lora.path}: {first.key}{more} names no layer of this model's {first.component}: "
            "a LoRA for another model (SDXL?) or a kind of module sd_jax does not apply"
        )
    for target in targets:
        if not _fits(target.module, target.kernel_shape):
            shape = target.kernel_shape
            torch_shape = (shape[-1], shape[-2]) + tuple(shape[:-2])
            raise LoRAError(
                f"{lora.path}: {target.module.key}: down {target.module.down.shape} / up {target.module.up.shape} "
                f"does not fit {target.component} {path_to_name(target.path)} of shape {torch_shape}: "
                "a LoRA for another base model (SD 1.x / SD 2.x)?"
            )
    return targets


def check_lora(lora: LoRAFile, states: Mapping[str, nnx.State]) -> None:
    """Checks that every pair of a LoRA file names a layer of the model and fits its shape.

    Args:
      lora: the file (`read_lora`).
      states: {"text_encoder", "unet", ...} -> nnx.State, real or abstract (`nnx.eval_shape`); only the shapes are
        read.

    Raises:
      LoRAError: one line naming the file and the first module the model lacks or whose shape differs.
    """
    _resolve(lora, _tables(states, lora.components()))


def module_delta(module: LoRAModule, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """scale * up @ down in float32, in the NNX layout of the kernel it updates ((in, out) or (kh, kw, in, out)).

    For a convolution, down (rank, in, kh, kw) and up (out, rank, 1, 1) give (out, in * kh * kw) -> (out, in, kh, kw)
    in PyTorch's layout, then the NNX one.
    """
    rank = module.rank
    fan_out, fan_in = kernel_shape[-1], kernel_shape[-2]
    up = np.asarray(module.up).astype(np.float32).reshape(fan_out, rank)
    down = np.asarray(module.down).astype(np.float32).reshape(rank, -1)
    delta = (up @ down) * np.float32(module.scale)
    delta = delta.reshape((fan_out, fan_in) + tuple(kernel_shape[:-2]))
    return np.ascontiguousarray(torch_to_flax_layout("kernel", delta))


def _cached_delta(lora: LoRAFile, target: Target) -> np.ndarray:
    key = (target.module.key, target.kernel_shape)
    if key not in lora.deltas:
        lora.deltas[key] = module_delta(target.module, target.kernel_shape)
    return lora.deltas[key]


@jax.jit
def _add(base: jax.Array, delta: jax.Array) -> jax.Array:
    """base + delta in float32, cast back to base's dtype (compiled once per kernel shape and dtype)."""
    return (base.astype(jnp.float32) + delta).astype(base.dtype)


def _add_to_state(state: nnx.State, deltas: Mapping[tuple, np.ndarray]) -> nnx.State:
    """A new state: each kernel of `deltas` (module path -> float32 delta) updated on its own devices and sharding,
    every other leaf the same array in a new variable."""
    flat = []
    for path, variable in nnx.to_flat_state(state):
        base = variable.get_value()
        delta = deltas.get(tuple(path[:-1])) if path[-1] == "kernel" else None
        if delta is not None:
            sharding = getattr(base, "sharding", None)
            if sharding is None:
                raise LoRAError(f"{path_to_name(path)}: LoRAs are added to real arrays, not {type(base).__name__}")
            value = _add(base, jax.device_put(delta, sharding))
            base = value if value.sharding == sharding else jax.device_put(value, sharding)
        flat.append((path, variable.replace(base)))
    return nnx.from_flat_state(flat)


def apply_loras(states: Mapping[str, nnx.State], loras: Sequence) -> dict[str, nnx.State]:
    """The model's states with LoRAs added: W + sum_i weight_i * scale_i * up_i @ down_i per kernel.

    Every file is checked (`check_lora`) before anything is computed. Kernels are updated in float32 and cast back to
    their dtype, each on the devices and with the sharding of the array it replaces.

    Args:
      states: {"text_encoder", "unet", "vae"} -> nnx.State of real arrays (a pipeline's `states`); not modified.
      loras: `ActiveLoRA`s, or `LoRAFile`s (weight 1), or tuples (lora, weight) / (lora, te_weight, unet_weight).

    Returns:
      A new dict; a component no LoRA changes (or whose weights are all 0) is the very same state object, so
      `apply_loras(states, [])` gives back the base arrays themselves.

    Raises:
      LoRAError: a file that does not fit the model (see `check_lora`).
    """
    active = [as_active(entry) for entry in loras]
    components = set().union(*(a.lora.components() for a in active)) if active else set()
    tables = _tables(states, components)
    resolved = [(a, _resolve(a.lora, tables)) for a in active]
    totals: dict[str, dict[tuple, np.ndarray]] = {}
    for entry, targets in resolved:
        for target in targets:
            weight = entry.weight(target.component)
            if weight == 0:
                continue
            scaled = np.float32(weight) * _cached_delta(entry.lora, target)
            sums = totals.setdefault(target.component, {})
            sums[target.path] = scaled if target.path not in sums else sums[target.path] + scaled
    out = dict(states)
    for component, deltas in totals.items():
        out[component] = _add_to_state(states[component], deltas)
    return out
