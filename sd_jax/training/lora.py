"""LoRA training: low-rank deltas on frozen weights, and the kohya-format `.safetensors` they are written as.

A LoRA module adds to a frozen kernel W the product of two small trained matrices, scaled by alpha / rank:

    W' = W + (alpha / rank) * down @ up          (NNX kernel layout: W is (in, out), or (1, 1, in, out) for a 1x1 conv)

`down` keeps the kernel's layout with `out` replaced by the rank: (in, rank) for a Linear kernel, (1, 1, in, rank) for
a 1x1 convolution; `up` is (rank, out) or (1, 1, rank, out). As in kohya's networks/lora.py, `down` starts as PyTorch's
default Linear initialisation (kaiming-uniform with a = sqrt(5): uniform in +-1/sqrt(fan_in)) and `up` at zero, so at
step 0 the model is exactly the base model.

Targets (kohya's defaults for Stable Diffusion 1.x / 2.x):
  U-Net: every Linear and 1x1 convolution inside a transformer container (diffusers' Transformer2DModel,
    `*.attentions.N`): proj_in, proj_out, attn1 / attn2 to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2.
  Text encoder: q_proj, k_proj, v_proj, out_proj of every self-attention and fc1, fc2 of every MLP.

The trained parameters are flat `{component: {"<module path>.lora_down": array, "<module path>.lora_up": array}}`
trees, the same shape of tree as the full parameters the rest of training handles.

The file (what kohya's scripts, diffusers' `load_lora_weights` and the common web UIs read):
  lora_unet_<module path, "." -> "_">.lora_down.weight   (rank, in) or (rank, in, 1, 1)   PyTorch layout
  lora_unet_<...>.lora_up.weight                          (out, rank) or (out, rank, 1, 1)
  lora_unet_<...>.alpha                                   () float32
  lora_te_text_model_<...>.*                              the text encoder (transformers' names have `text_model.`)
and kohya's `ss_*` training metadata in the header.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

from sd_jax.convert.params import flax_to_torch_layout
from sd_jax.convert.torch_files import write_safetensors
from sd_jax.lora import LoRAError

DOWN, UP = "lora_down", "lora_up"

# Module paths (without the `.kernel` leaf) that carry a LoRA, per component.
_TARGETS = {
    "unet": re.compile(r"(?:(?:down|up)_blocks\.\d+|mid_block)\.attentions\.\d+\..+"),
    "text_encoder": re.compile(r"encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"),
}
# The file's key prefix per component: kohya names transformers' CLIP weights `text_model.*`.
_FILE_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}


def lora_targets(component: str, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The module paths of a component that get a LoRA, sorted.

    Args:
      component: "unet" or "text_encoder".
      shapes: the component's flat parameter names -> shapes (`"a.b.kernel" -> (in, out)`).

    Returns:
      paths such as `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`: every Linear kernel (2-D) and 1x1
      convolution kernel (1, 1, in, out) that kohya's default LoRA network wraps.
    """
    if component not in _TARGETS:
        raise LoRAError(f"LoRA training covers {', '.join(_TARGETS)}, not {component!r}")
    pattern, found = _TARGETS[component], []
    for name, shape in shapes.items():
        module, _, leaf = name.rpartition(".")
        linear = len(shape) == 2
        pointwise = len(shape) == 4 and tuple(shape[:2]) == (1, 1)
        if leaf == "kernel" and (linear or pointwise) and pattern.fullmatch(module):
            found.append(module)
    if not found:
        raise LoRAError(f"{component}: no LoRA target found among {len(shapes)} parameters")
    return sorted(found)


def init_lora(shapes: Mapping[str, tuple[int, ...]], targets: list[str], rank: int, seed: tuple[int, ...]) -> dict:
    """Fresh LoRA parameters for `targets`: down ~ U(+-1/sqrt(fan_in)) (kaiming-uniform, a = sqrt(5)), up = 0.

    Args:
      shapes: the component's flat parameter names -> shapes (each target's `<path>.kernel` is looked up).
      targets: module paths from `lora_targets`.
      rank: the inner dimension r.
      seed: target i draws from `np.random.default_rng((*seed, i))` (on the host: compiling a program per shape
        would cost more than the draws).

    Returns:
      `{"<path>.lora_down": (..., in, r), "<path>.lora_up": (..., r, out)}` float32 numpy arrays.
    """
    lora = {}
    for index, module in enumerate(targets):
        shape = tuple(shapes[f"{module}.kernel"])
        lead, fan_in, out = shape[:-2], shape[-2], shape[-1]
        bound = 1.0 / np.sqrt(fan_in * int(np.prod(lead, dtype=np.int64)))
        rng = np.random.default_rng((*seed, index))
        lora[f"{module}.{DOWN}"] = rng.uniform(-bound, bound, (*lead, fan_in, rank)).astype(np.float32)
        lora[f"{module}.{UP}"] = np.zeros((*lead, rank, out), np.float32)
    return lora


def lora_modules(lora: Mapping[str, object]) -> list[str]:
    """The module paths of a flat LoRA tree, sorted."""
    return sorted(name[: -len(DOWN) - 1] for name in lora if name.endswith(f".{DOWN}"))


def lora_delta(down: jax.Array, up: jax.Array, scale: float, shape: tuple[int, ...]) -> jax.Array:
    """scale * down @ up in a kernel's layout `shape`: (in, out) or (1, 1, in, out)."""
    rank = down.shape[-1]
    return (scale * (down.reshape(-1, rank) @ up.reshape(rank, -1))).reshape(shape)


def apply_lora(base: Mapping[str, jax.Array], lora: Mapping[str, jax.Array], scale: float) -> dict:
    """The parameters with each LoRA'd kernel replaced by W + scale * down @ up (traceable; gradients reach only
    `lora` when `base` is held constant). Unmodified entries are the same arrays as in `base`."""
    merged = dict(base)
    modules = lora_modules(lora)
    if 2 * len(modules) != len(lora):
        raise LoRAError(f"LoRA parameters must come in {DOWN} / {UP} pairs, got {len(lora)} arrays")
    for module in modules:
        name = f"{module}.kernel"
        if name not in base:
            raise LoRAError(f"LoRA module {module} has no kernel in the base parameters")
        kernel = base[name]
        delta = lora_delta(lora[f"{module}.{DOWN}"], lora[f"{module}.{UP}"], scale, tuple(kernel.shape))
        merged[name] = kernel + delta.astype(kernel.dtype)
    return merged


def kohya_key(component: str, module: str) -> str:
    """The file's name of a module: `lora_unet_down_blocks_0_..._to_q`, `lora_te_text_model_encoder_..._q_proj`."""
    return _FILE_PREFIX[component] + module.replace(".", "_")


def kohya_state_dict(params: Mapping[str, Mapping], alpha: float, dtype=np.float32) -> dict[str, np.ndarray]:
    """The kohya-format tensors of LoRA parameters `{component: flat LoRA tree}`, in PyTorch layout.

    Returns:
      `{"<key>.lora_down.weight": (r, in[, 1, 1]), "<key>.lora_up.weight": (out, r[, 1, 1]), "<key>.alpha": ()}`
      with `dtype` weights and a float32 alpha, in module order.
    """
    tensors = {}
    for component in sorted(params, key=lambda c: list(_FILE_PREFIX).index(c)):
        flat = params[component]
        for module in lora_modules(flat):
            key = kohya_key(component, module)
            for part in (DOWN, UP):
                array = np.asarray(jax.device_get(flat[f"{module}.{part}"]), np.float32)
                tensors[f"{key}.{part}.weight"] = np.ascontiguousarray(flax_to_torch_layout("kernel", array), dtype)
            tensors[f"{key}.alpha"] = np.asarray(alpha, np.float32)
    return tensors


def kohya_metadata(*, rank: int, alpha: float, family: str, v_prediction: bool, **extra) -> dict[str, str]:
    """kohya's `ss_*` header fields that LoRA readers look at (network type, rank, alpha, base model), and `extra`
    (`ss_<name>`, stringified)."""
    version = "sd_v1" if family == "sd1" else "sd_v2"
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": version,
        "ss_v2": str(family != "sd1"),
        "ss_v_parameterization": str(v_prediction),
    }
    metadata.update({f"ss_{name}": str(value) for name, value in extra.items()})
    return metadata


def write_kohya_lora(
    path: str | os.PathLike, params: Mapping[str, Mapping], *, alpha: float, metadata: Mapping[str, str] | None = None
) -> Path:
    """Writes LoRA parameters as a kohya-format `.safetensors` (float32), under a temporary name then renamed."""
    path = Path(path)
    tensors = kohya_state_dict(params, alpha)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write_safetensors(tmp, tensors, metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = [
    "lora_targets",
    "init_lora",
    "lora_modules",
    "lora_delta",
    "apply_lora",
    "kohya_key",
    "kohya_state_dict",
    "kohya_metadata",
    "write_kohya_lora",
]
