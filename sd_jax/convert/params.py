"""Mapping PyTorch state dicts onto Flax NNX parameter trees, with every key and shape checked.

Our NNX modules use the attribute names of the diffusers / transformers PyTorch modules, so a PyTorch key
`down_blocks.0.resnets.1.conv1.weight` names the NNX path `('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel')`.
Only the leaf name and the layout differ:

  PyTorch                         NNX
  Linear.weight (out, in)         kernel (in, out)
  Conv2d.weight (out, in, kh, kw) kernel (kh, kw, in, out)
  *Norm.weight (C,)               scale (C,)
  Embedding.weight (N, D)         embedding (N, D)
  *.bias                          bias

The one naming difference is the text encoder's: hub folders name transformers' CLIPTextModel weights
`text_model.*`, and `sd_jax.modules.clip_text.CLIPTextModel` has no such level (`clip_state_dict_for_flax`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class ConversionError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


def abstract_model(make: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
    """Builds a model's graph and an abstract state (shapes and dtypes only, nothing allocated)."""
    model = nnx.eval_shape(make)
    graphdef, state = nnx.split(model)
    return graphdef, state


def path_to_name(path: tuple) -> str:
    """('down_blocks', 0, 'conv', 'kernel') -> 'down_blocks.0.conv.kernel'."""
    return ".".join(str(p) for p in path)


def torch_name(path: tuple) -> str:
    """The PyTorch state-dict key of an NNX parameter path."""
    leaf = path[-1]
    if leaf not in _TORCH_LEAF:
        raise ConversionError(f"no PyTorch name for parameter leaf {leaf!r} at {path_to_name(path)}")
    return ".".join([str(p) for p in path[:-1]] + [_TORCH_LEAF[leaf]])


def torch_to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """Transposes one PyTorch tensor into the layout of the NNX leaf it fills."""
    if leaf == "kernel" and array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if leaf == "kernel" and array.ndim == 2:
        return np.transpose(array, (1, 0))
    return array


def flax_to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """The inverse of `torch_to_flax_layout`."""
    if leaf == "kernel" and array.ndim == 4:
        return np.transpose(array, (3, 2, 0, 1))
    if leaf == "kernel" and array.ndim == 2:
        return np.transpose(array, (1, 0))
    return array


def _format_keys(title: str, keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{title} ({len(keys)}): {shown}{more}"


def fill_state(
    abstract: nnx.State,
    arrays: Mapping[str, np.ndarray],
    *,
    source_name: Callable[[tuple], str],
    transform: Callable[[str, np.ndarray], np.ndarray],
    dtype=jnp.float32,
    component: str = "model",
    consume: bool = False,
) -> nnx.State:
    """Fills an abstract NNX state from named arrays, consuming every array exactly once.

    One tensor at a time: looked up, put in the target layout and cast to `dtype` on the host, then copied to the
    device, and the host copy dropped before the next. With a lazy `arrays` (`torch_files.SafetensorsFile`) or
    `consume`, the host never holds more than a tensor or two beyond what is still to be placed.

    Args:
      abstract: the state of `nnx.eval_shape(...)`; gives every target path, shape and variable type.
      arrays: source name -> array (numpy, any float dtype), or a mapping that reads each when it is looked up.
      source_name: the source name of a target path.
      transform: (target leaf name, source array) -> array in the target layout.
      dtype: the floating dtype of the result.
      component: named in errors.
      consume: pop each array from `arrays` (a dict the caller gives up) once it has been placed.

    Raises:
      ConversionError: listing missing keys, unexpected keys and shape mismatches together.
    """
    targets = {}
    for path, variable in nnx.to_flat_state(abstract):
        targets[source_name(path)] = (path, variable)
    missing = sorted(set(targets) - set(arrays))
    unexpected = sorted(set(arrays) - set(targets))
    mismatched = []
    filled = []
    host_dtype = np.dtype(dtype)
    for name, (path, variable) in targets.items():
        if name not in arrays:
            continue
        value = transform(path[-1], np.asarray(arrays.pop(name) if consume else arrays[name]))
        expected = tuple(variable.get_value().shape)
        if tuple(value.shape) != expected:
            mismatched.append(f"{name}: checkpoint {tuple(value.shape)} vs model {expected}")
            continue
        if missing or unexpected or mismatched:
            continue  # an error follows: nothing more is placed, only shapes checked
        # Cast per tensor on the host: a bfloat16 model never has a float32 copy, and nothing compiles (a device-side
        # cast compiles a program per shape). astype keeps the source's memory order, so the cast runs over
        # contiguous memory and the transpose (ascontiguousarray) then moves the smaller dtype. device_put copies:
        # the device array owns its memory, never a view of a caller's array or of a file mapping.
        host = np.ascontiguousarray(value.astype(host_dtype, copy=False))
        filled.append((path, variable.replace(jax.device_put(host))))
        del value, host
    if missing or unexpected or mismatched:
        parts = [f"{component}: checkpoint does not match the model architecture"]
        if missing:
            parts.append(_format_keys("missing keys", missing))
        if unexpected:
            parts.append(_format_keys("unexpected keys", unexpected))
        if mismatched:
            parts.append(_format_keys("shape mismatches", mismatched, limit=10))
        raise ConversionError("; ".join(parts))
    return nnx.from_flat_state(filled)


class TensorView(Mapping):
    """A state dict seen lazily through new names and a dtype: `view[name]` is `source[names[name]]` (all of the
    source's names when `names` is None), its floating-point tensors cast to `dtype` when one is given; nothing is
    read before it is looked up (a lazy source stays lazy)."""

    def __init__(self, source: Mapping[str, Any], names: Mapping[str, str] | None = None, dtype=None):
        self._source = source
        self._names = dict(names) if names is not None else {name: name for name in source}
        self._dtype = None if dtype is None else np.dtype(dtype)

    def __getitem__(self, name: str):
        array = self._source[self._names[name]]
        if self._dtype is not None and jnp.issubdtype(np.asarray(array).dtype, jnp.floating):
            return np.asarray(array).astype(self._dtype, copy=False)
        return array

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._names


def clip_state_dict_for_flax(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Normalises a transformers CLIPTextModel state dict to the names `CLIPTextModel` expects.

    Strips the `text_model.` prefix that hub folders (transformers < 5) carry and drops the
    `embeddings.position_ids` buffer older checkpoints saved (it is always `arange(max_position_embeddings)`).
    Every other key is kept, so `state_from_torch` reports anything unexpected. Only names change: the result is a
    view (`TensorView`) that reads no tensor before it is looked up.
    """
    names = {}
    for source in state_dict:
        name = source.removeprefix("text_model.")
        if name == "embeddings.position_ids":
            continue
        if name in names:
            raise ValueError(f"state dict has {name!r} both with and without the 'text_model.' prefix")
        names[name] = source
    return TensorView(state_dict, names)


def clip_state_dict_for_torch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `clip_state_dict_for_flax`: adds the `text_model.` prefix of hub folders' CLIPTextModel
    weights, which every transformers version loads (transformers >= 5 itself saves the names without it)."""
    return {f"text_model.{name}": value for name, value in state_dict.items()}


def state_from_torch(
    abstract: nnx.State,
    state_dict: Mapping[str, np.ndarray],
    *,
    dtype=jnp.float32,
    component: str = "model",
    consume: bool = False,
) -> nnx.State:
    """Fills an abstract NNX state from a PyTorch-named state dict (diffusers / transformers names); see
    `fill_state` for `consume`."""
    return fill_state(
        abstract,
        state_dict,
        source_name=torch_name,
        transform=torch_to_flax_layout,
        dtype=dtype,
        component=component,
        consume=consume,
    )


def state_from_flat(
    abstract: nnx.State, flat: Mapping[str, np.ndarray], *, dtype=jnp.float32, component: str = "model"
) -> nnx.State:
    """Fills an abstract NNX state from our own flat `path.joined.by.dots` arrays (a converted folder)."""
    return fill_state(
        abstract, flat, source_name=path_to_name, transform=lambda _, a: a, dtype=dtype, component=component
    )


def state_to_flat(state: nnx.State) -> dict[str, np.ndarray]:
    """An NNX state as flat `path.joined.by.dots` numpy arrays."""
    return {path_to_name(p): np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(state)}


def state_to_torch(state: nnx.State) -> dict[str, np.ndarray]:
    """An NNX state as a PyTorch-named, PyTorch-layout state dict (for tests and export)."""
    out = {}
    for path, variable in nnx.to_flat_state(state):
        out[torch_name(path)] = flax_to_torch_layout(path[-1], np.asarray(jax.device_get(variable.get_value())))
    return out
