"""Reading PyTorch weight files (`.safetensors`, pickled `.ckpt` / `.pt` / `.pth` / `.bin`) into numpy, safely.

Every reader returns a mapping keyed by the file's own state-dict names, tensors in their PyTorch layout and dtype.
bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays (the dtype JAX itself uses, installed with jax): exact, no
float32 copy, and the converter casts them later. A `.safetensors` file is read lazily (`SafetensorsFile`): each
tensor is read from disk when it is looked up, so a loader that converts and places one tensor at a time never holds
more than one on the host. `write_safetensors` is its counterpart for writing: one tensor at a time too.

Pickled files are opened with `torch.load(weights_only=True)`, whose restricted unpickler only rebuilds tensors and
plain containers: a pickle that names any other callable (`os.system`, `eval`, a class with `__reduce__`) is refused
before anything from it runs. torch is optional (`pip install 'sd_jax[torch]'`); `.safetensors` needs no torch.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A weight file cannot be read, is unsafe to read, or is not the checkpoint it claims to be."""


def read_state_dict(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """Reads a PyTorch weight file into numpy arrays, choosing the reader by the file extension.

    `read_checkpoint` also gives what a Lightning checkpoint stores beside its weights.

    Args:
      path: a `.safetensors`, `.ckpt`, `.pt`, `.pth` or `.bin` file.

    Returns:
      state-dict name -> array in the PyTorch layout (a nested Lightning `state_dict` is unwrapped); for a
      `.safetensors` file a `SafetensorsFile`, which reads each array when it is looked up.

    Raises:
      CheckpointError: missing file, directory, unknown extension, corrupt file, or a pickle that would run code.
    """
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | os.PathLike) -> tuple[Mapping[str, np.ndarray], dict[str, int]]:
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


# safetensors dtype names -> numpy dtypes (little-endian, as the format stores them).
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# The format's own limit on the JSON header (safetensors refuses larger ones).
_MAX_HEADER_BYTES = 100_000_000


class SafetensorsFile(Mapping):
    """A `.safetensors` file's tensors by name, each read from disk when it is looked up and not kept.

    Opening reads and checks only the header (names, dtypes, shapes, byte ranges against the file size). `file[name]`
    reads that one tensor into a new numpy array with plain reads: no memory map, whose touched pages would stay in
    the process's resident memory until the file is closed. bfloat16 and float8 come back as `ml_dtypes` arrays.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                header_bytes = int.from_bytes(f.read(8), "little") if size >= 8 else -1
                if not 0 < header_bytes <= min(_MAX_HEADER_BYTES, size - 8):
                    raise ValueError(f"header length {header_bytes} does not fit a file of {size} bytes")
                header = json.loads(f.read(header_bytes))
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise self._error(e) from e
        if not isinstance(header, dict):
            raise self._error("the header is not a JSON object")
        self._start = 8 + header_bytes
        metadata = header.get("__metadata__") or {}
        # The header's free-form strings (kohya's `ss_*` fields, diffusers' LoRA adapter config, ...).
        self.metadata = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
        self._tensors: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise self._error(f"{name}: bad header entry {entry!r} ({type(e).__name__}: {e})") from None
            if end - begin != math.prod(shape) * dtype.itemsize or begin < 0 or self._start + end > size:
                raise self._error(f"{name}: bytes {begin}..{end} do not hold {entry['dtype']}{list(shape)}")
            self._tensors[name] = (dtype, shape, begin)

    def _error(self, reason) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a readable .safetensors file (truncated or corrupt?): {reason}")

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin = self._tensors[name]
        array = np.empty(shape, dtype)
        buffer = array.reshape(-1).view(np.uint8)
        try:
            with open(self.path, "rb") as f:
                f.seek(self._start + begin)
                read = f.readinto(buffer)
        except OSError as e:
            raise self._error(e) from e
        if read != buffer.size:
            raise self._error(f"{name}: the file ends inside the tensor")
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name) -> bool:
        return name in self._tensors


def read_safetensors(path: str | os.PathLike) -> SafetensorsFile:
    """Opens a `.safetensors` file (no code can run from this format) as a lazy `SafetensorsFile`."""
    return SafetensorsFile(path)


_SAFETENSORS_NAMES = {np.dtype(dtype): name for name, dtype in _SAFETENSORS_DTYPES.items()}


def write_safetensors(
    path: str | os.PathLike, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes a `.safetensors` file one tensor at a time: the host holds one tensor's bytes, not the file's.

    Args:
      path: the file to write (replaced if it exists; callers write under a temporary name and rename).
      arrays: name -> array with `.shape`, `.dtype` and numpy conversion (numpy, or JAX arrays, which are fetched
        from their device one by one).
      metadata: the header's string-to-string `__metadata__`.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, array in arrays.items():
        dtype = np.dtype(array.dtype)
        if dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"{name}: safetensors cannot store dtype {dtype}")
        size = math.prod(array.shape) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header with spaces to align the data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for array in arrays.values():
            host = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            f.write(host.data)


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
