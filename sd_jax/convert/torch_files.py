"""Reading PyTorch weight files (`.safetensors`, pickled `.ckpt` / `.pt` / `.pth` / `.bin`) into numpy, safely.

Every reader returns `dict[str, np.ndarray]` keyed by the file's own state-dict names, tensors in their PyTorch
layout and dtype. bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays (the dtype JAX itself uses, installed
with jax): exact, no float32 copy, and `jnp.asarray(..., dtype)` converts them later.

Pickled files are opened with `torch.load(weights_only=True)`, whose restricted unpickler only rebuilds tensors and
plain containers: a pickle that names any other callable (`os.system`, `eval`, a class with `__reduce__`) is refused
before anything from it runs. torch is optional (`pip install 'sd_jax[torch]'`); `.safetensors` needs no torch.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping

import ml_dtypes
import numpy as np

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A weight file cannot be read, is unsafe to read, or is not the checkpoint it claims to be."""


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch weight file into numpy arrays, choosing the reader by the file extension.

    `read_checkpoint` also gives what a Lightning checkpoint stores beside its weights.

    Args:
      path: a `.safetensors`, `.ckpt`, `.pt`, `.pth` or `.bin` file.

    Returns:
      state-dict name -> array in the PyTorch layout (a nested Lightning `state_dict` is unwrapped).

    Raises:
      CheckpointError: missing file, directory, unknown extension, corrupt file, or a pickle that would run code.
    """
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """`read_state_dict` and the file's training counters: {"global_step": N} when a pickled checkpoint has one
    (the original SD 2.x files are told apart by it), else {}."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected a single weight file (.safetensors or .ckpt)")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors(path), {}
    if suffix in PICKLE_SUFFIXES:
        extras = {}
        return read_torch_pickle(path, extras), extras
    known = ", ".join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
    raise CheckpointError(f"{path}: unknown weight file extension {suffix or '(none)'!r}; expected one of {known}")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` file (no code can run from this format); bfloat16 stays `ml_dtypes.bfloat16`."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    out = {}
    try:
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {e}") from e
    return out


def read_torch_pickle(path: str | os.PathLike, extras: dict | None = None) -> dict[str, np.ndarray]:
    """Reads a pickled PyTorch file with `torch.load(weights_only=True)`; refuses pickles that would run code.

    A top-level `state_dict` entry (Lightning checkpoints such as the original Stable Diffusion `.ckpt`) is
    unwrapped and the rest of the top level (`global_step`, `epoch`, optimizer state, ...) is dropped, except an
    integer `global_step`, which goes into `extras` when given. Within the state dict, entries that are not tensors
    are skipped.
    """
    path = os.fspath(path)
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path}: reading pickled PyTorch files needs torch: pip install 'sd_jax[torch]' "
            "(or convert the file to .safetensors)"
        ) from e
    # mmap needs the zip format (torch >= 1.6); the older tar-style files are read into memory.
    mmap = zipfile.is_zipfile(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refusing to load: the file's pickle tries to {_refused_what(str(e))}; it may contain code. "
            "Only tensors and plain containers are accepted; convert the file to .safetensors with a trusted tool."
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch file (truncated or corrupt?): {first_line}") from e
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        step = loaded.get("global_step")
        if extras is not None and isinstance(step, int | torch.Tensor) and np.size(step) == 1:
            extras["global_step"] = int(step)
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(loaded)}")
    out = {}
    for name, value in loaded.items():
        if isinstance(value, torch.Tensor):
            out[str(name)] = tensor_to_numpy(value)
        # Anything else inside a state dict (step counters, nested metadata) carries no weights.
    return out


def tensor_to_numpy(tensor) -> np.ndarray:
    """A torch tensor as a numpy array of the same dtype; bfloat16 becomes `ml_dtypes.bfloat16` bit for bit."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        ml = ml_dtypes.float8_e4m3fn if tensor.dtype == torch.float8_e4m3fn else ml_dtypes.float8_e5m2
        return tensor.view(torch.uint8).numpy().view(ml)
    return tensor.numpy()


def _refused_what(message: str) -> str:
    """The useful line of torch's weights_only refusal ("... unsupported GLOBAL posix.system ...")."""
    for line in message.splitlines():
        if "GLOBAL" in line or ("Unsupported" in line and "global" in line.lower()):
            return "load " + line.strip().removeprefix("Trying to load ").rstrip(".")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return "run something other than tensor rebuilding (" + (lines[-1] if lines else "unknown") + ")"
