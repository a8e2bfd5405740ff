"""Reading LoRA files: kohya / AUTOMATIC1111 and diffusers / PEFT formats, `.safetensors` or a safe pickle.

`read_lora(path)` reads every low-rank pair of a file into a `LoRAFile`, in the PyTorch layout and the file's dtype:

  down (A)   (rank, in) for a Linear layer, (rank, in, kh, kw) for a convolution (LoCon: kh x kw as the layer's own)
  up (B)     (out, rank), or (out, rank, 1, 1)
  alpha      a scalar, or None: the pair adds scale * up @ down with scale = alpha / rank (1 without an alpha)

Alphas come from the file's `.alpha` keys (kohya writes one per module), or, for diffusers' PEFT files, from the
`lora_adapter_metadata` that `save_lora_weights` puts in the safetensors header (`unet.lora_alpha`,
`unet.alpha_pattern`, `use_rslora`: alpha / sqrt(rank)). A PEFT file with neither has scale 1 (alpha = rank), as
diffusers loads it; an `.alpha` key in a PEFT file counts (AUTOMATIC1111 reads it; diffusers ignores it).

Which model the modules belong to is decided later, against the model itself (`sd_jax.lora.apply.check_lora`).
LyCORIS kinds other than plain LoRA / LoCon (LoHa, LoKr, Tucker `lora_mid`, DoRA, ...) and SDXL files are refused
with a one-line `LoRAError` naming the file and the kind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from sd_jax.convert.torch_files import SAFETENSORS_SUFFIXES, CheckpointError, read_state_dict
from sd_jax.lora.keys import BUNDLED_EMBEDDINGS, KeyParts, parse_key, unsupported_kind

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin", ".pth")
# The safetensors header entry where diffusers' `save_lora_weights` stores the PEFT LoraConfig of each component.
ADAPTER_METADATA = "lora_adapter_metadata"
_HASH_CHUNK = 1 << 20


class LoRAError(ValueError):
    """A LoRA file cannot be read, is of a kind sd_jax does not apply, or does not fit the model."""


@dataclasses.dataclass(frozen=True, eq=False)
class LoRAModule:
    """One low-rank pair: the weight update scale * up @ down of one Linear or Conv layer.

    Attributes:
      component: "unet" or "text_encoder".
      name: the module's name as the file spells it (see `sd_jax.lora.keys.KeyParts`).
      kohya: whether `name` is underscored (kohya) rather than dotted.
      down: (rank, in) or (rank, in, kh, kw), PyTorch layout, the file's dtype.
      up: (out, rank) or (out, rank, 1, 1).
      alpha: the file's alpha, or None (scale 1).
      rslora: PEFT's rank-stabilised scaling, alpha / sqrt(rank).
      key: the file's key of `down`, for messages.
    """

    component: str
    name: str
    kohya: bool
    down: np.ndarray
    up: np.ndarray
    alpha: float | None
    rslora: bool
    key: str

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """The factor of up @ down: alpha / rank (AUTOMATIC1111, kohya, PEFT), or 1 without an alpha."""
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(eq=False)
class LoRAFile:
    """A LoRA file's low-rank pairs, ready to check against a model and add to its weights.

    Attributes:
      path: the file.
      name: the file's stem, the name AUTOMATIC1111's `<lora:name:weight>` uses.
      format: "kohya" (kohya / AUTOMATIC1111 names), "peft" (diffusers' lora_A / lora_B) or "diffusers" (older
        diffusers names: `to_q_lora.down`, `lora.down`, `lora_linear_layer.down`).
      modules: every pair, in the file's order.
      metadata: the safetensors header's `__metadata__` ({} for pickles).
      ignored: keys read but not applied, each with the reason (bundled textual-inversion embeddings).
      deltas: filled by `apply_loras`: (module name, kernel shape) -> scale * up @ down as float32 in the kernel's
        NNX layout, computed once per file; it holds as many float32 numbers as the layers the file touches.
    """

    path: Path
    name: str
    format: str
    modules: tuple[LoRAModule, ...]
    metadata: Mapping[str, str]
    ignored: Mapping[str, str] = dataclasses.field(default_factory=dict)
    deltas: dict = dataclasses.field(default_factory=dict, repr=False)

    def components(self) -> set[str]:
        """The components ("unet", "text_encoder") the file changes."""
        return {module.component for module in self.modules}


def _scalar(path: Path, key: str, value: Any) -> float:
    array = np.asarray(value)
    if array.size != 1 or not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
        raise LoRAError(f"{path}: {key} should be one number, got shape {array.shape} dtype {array.dtype}")
    return float(array.astype(np.float64).reshape(()))


def _peft_configs(path: Path, metadata: Mapping[str, str]) -> dict[str, dict]:
    """component -> the LoraConfig fields diffusers saved for it (`unet.lora_alpha` -> {"unet": {"lora_alpha"}})."""
    raw = metadata.get(ADAPTER_METADATA)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise LoRAError(f"{path}: the header's {ADAPTER_METADATA} is not JSON") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{path}: the header's {ADAPTER_METADATA} is not a JSON object")
    out: dict[str, dict] = {}
    for key, value in config.items():
        component, _, field = str(key).partition(".")
        if field:
            out.setdefault(component, {})[field] = value
    return out


def _pattern_match(patterns: Mapping[str, Any], name: str) -> Any:
    """PEFT's rule for `alpha_pattern` / `rank_pattern`: the first pattern the module name ends with (as a regex)."""
    for pattern, value in patterns.items():
        for candidate in (name, name.removeprefix("text_model."), "text_model." + name):
            if re.match(rf"(.*\.)?({pattern})$", candidate):
                return value
    return None


# PEFT's LoraConfig default, which a saved config without `lora_alpha` gets.
_PEFT_DEFAULT_ALPHA = 8.0


def _peft_alpha(config: Mapping[str, Any], name: str) -> float:
    """A module's alpha under a saved LoraConfig: its `alpha_pattern` entry, else `lora_alpha`."""
    alpha = _pattern_match(config.get("alpha_pattern") or {}, name)
    if alpha is None:
        alpha = config.get("lora_alpha", _PEFT_DEFAULT_ALPHA)
    try:
        return float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"lora_alpha {alpha!r} of {name} is not a number") from None


def _read_tensors(path: Path) -> tuple[Mapping[str, Any], dict[str, str]]:
    if not path.is_file():
        raise LoRAError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise LoRAError(f"{path}: not a LoRA file extension; expected one of {', '.join(LORA_SUFFIXES)}")
    try:
        tensors = read_state_dict(path)
        metadata = dict(getattr(tensors, "metadata", {}))  # a .safetensors header's strings
    except CheckpointError as e:
        message = str(e).splitlines()[0]
        raise LoRAError(message if str(path) in message else f"{path}: {message}") from e
    return tensors, metadata


def _group(path: Path, tensors: Mapping[str, Any]) -> tuple[dict[tuple, dict[str, tuple[str, Any]]], dict, str]:
    """(component, module name, kohya) -> role -> (key, value); the ignored keys; the format."""
    groups: dict[tuple, dict[str, tuple[str, Any]]] = {}
    ignored: dict[str, str] = {}
    unknown: list[str] = []
    for key in tensors:
        kind = unsupported_kind(key)
        if kind is not None:
            raise LoRAError(f"{path}: {kind} weights ({key}) are not supported; only plain LoRA / LoCon pairs")
        if key.startswith(BUNDLED_EMBEDDINGS):
            ignored[key] = "bundled textual-inversion embedding (load it as an embedding)"
            continue
        try:
            parts: KeyParts | None = parse_key(key)
        except ValueError as e:
            raise LoRAError(f"{path}: {e}") from None
        if parts is None:
            unknown.append(key)
            continue
        slot = groups.setdefault((parts.component, parts.module, parts.kohya), {})
        if parts.role in slot:
            raise LoRAError(f"{path}: {key} and {slot[parts.role][0]} name the same {parts.role} weight")
        slot[parts.role] = (key, tensors[key])
    if not groups:
        shown = ", ".join(list(tensors)[:3]) or "the file is empty"
        raise LoRAError(f"{path}: no LoRA weights (lora_down/lora_up or lora_A/lora_B) found; keys: {shown}")
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise LoRAError(f"{path}: key {unknown[0]!r}{more} is not a LoRA weight sd_jax knows")
    if ignored:
        log.warning("%s: ignored %d keys: %s", path, len(ignored), next(iter(ignored.values())))
    kohya = {k for _, _, k in groups}
    if len(kohya) > 1:
        raise LoRAError(f"{path}: mixes kohya (lora_unet_*) and diffusers (unet.*) key names")
    if kohya == {True}:
        return groups, ignored, "kohya"
    peft = any(key.endswith(".lora_A.weight") for slot in groups.values() for key, _ in slot.values())
    return groups, ignored, "peft" if peft else "diffusers"


def _module(path: Path, where: tuple, slot: dict, config: Mapping[str, Any]) -> LoRAModule:
    component, name, kohya = where
    if "down" not in slot or "up" not in slot:
        have = (slot.get("down") or slot.get("up") or slot["alpha"])[0]
        lacking = "down (A)" if "down" not in slot else "up (B)"
        raise LoRAError(f"{path}: {have} has no {lacking} weight beside it")
    down_key, down = slot["down"]
    up_key, up = slot["up"]
    down, up = np.asarray(down), np.asarray(up)
    fits = down.ndim in (2, 4) and up.ndim in (2, 4) and up.shape[2:] in ((), (1, 1)) and up.shape[1] == down.shape[0]
    if not fits:
        raise LoRAError(f"{path}: {down_key} {down.shape} and {up_key} {up.shape} are not a low-rank pair")
    alpha = _scalar(path, slot["alpha"][0], slot["alpha"][1]) if "alpha" in slot else None
    if config:
        try:
            alpha = _peft_alpha(config, name)
        except ValueError as e:
            raise LoRAError(f"{path}: the header's {ADAPTER_METADATA}: {e}") from None
    return LoRAModule(component, name, kohya, down, up, alpha, bool(config.get("use_rslora")), down_key)


def read_lora(path: str | os.PathLike) -> LoRAFile:
    """Reads a LoRA file (`.safetensors`, or a `.pt` / `.ckpt` / `.bin` / `.pth` pickle read safely).

    Raises:
      LoRAError: one line naming the file: missing, unreadable or corrupt, a pickle that would run code, no LoRA
        weights, keys sd_jax does not know, an unsupported LyCORIS kind or SDXL, a pair whose shapes do not match.
    """
    path = Path(path)
    tensors, metadata = _read_tensors(path)
    try:
        groups, ignored, fmt = _group(path, tensors)
        configs = _peft_configs(path, metadata) if fmt != "kohya" else {}
        modules = tuple(_module(path, where, slot, configs.get(where[0], {})) for where, slot in groups.items())
    except CheckpointError as e:  # a lazily read tensor turned out unreadable
        raise LoRAError(str(e).splitlines()[0]) from e
    return LoRAFile(path, path.stem, fmt, modules, metadata, ignored)


def short_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's LoRA hash, the one its "Lora hashes" infotext shows: 12 hex digits.

    For a `.safetensors` file: the header's `sshs_model_hash` when kohya wrote one, else the "addnet" hash, sha256
    of the bytes after the 8-byte length and the JSON header (so editing the metadata keeps the hash). For any other
    file: sha256 of the whole file.
    """
    path = Path(path)
    safetensors = path.suffix.lower() in SAFETENSORS_SUFFIXES
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            if safetensors:
                length = int.from_bytes(f.read(8), "little")
                try:
                    header = json.loads(f.read(length))
                except ValueError:
                    raise LoRAError(f"{path}: not a readable .safetensors file (bad header)") from None
                metadata = header.get("__metadata__") if isinstance(header, dict) else None
                stored = metadata.get("sshs_model_hash") if isinstance(metadata, dict) else None
                if stored:
                    return str(stored)[:12]
                f.seek(8 + length)
            for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
                digest.update(chunk)
    except OSError as e:
        raise LoRAError(f"{path}: cannot read: {e.strerror or e}") from None
    return digest.hexdigest()[:12]
