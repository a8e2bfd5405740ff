"""Writing a model back in the PyTorch formats: a diffusers pipeline folder or an original single file.

    export_diffusers     DIR/model_index.json, unet/ and vae/ (config.json + diffusion_pytorch_model.safetensors),
                         text_encoder/ (config.json + model.safetensors, transformers' `text_model.*` names),
                         tokenizer/, scheduler/scheduler_config.json; no safety checker
    export_single_file   FILE.safetensors in the original (CompVis / LDM) layout, written through the single-file
                         converter's tables read backwards (`single_file.join_original`)

Both are the inverse of loading: `load_components` of what they write gives back the same parameter arrays, bit for
bit. Each output is written under a temporary name beside its destination and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from sd_jax.config import ModelConfig
from sd_jax.convert import single_file
from sd_jax.convert.params import clip_state_dict_for_torch, flax_to_torch_layout, state_to_torch, torch_name
from sd_jax.convert.torch_files import CheckpointError
from sd_jax.loading import RANDOM_PREFIX, LoadError, load_components
from sd_jax.models import COMPONENTS, abstract_components, resolve_dtype
from sd_jax.modules.clip_text import CLIPTextConfig
from sd_jax.modules.unet import UNetConfig
from sd_jax.modules.vae import VAEConfig

FORMATS = ("diffusers", "single_file")

# What transformers and diffusers check in a safetensors header: the tensors are PyTorch's.
_METADATA = {"format": "pt"}
_WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}
_CONFIG_CLASSES = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig}
# A single file's text encoder layout follows from the activation: OpenAI CLIP (SD 1.x) or OpenCLIP (SD 2.x).
_LAYOUT_OF_ACTIVATION = {"quick_gelu": "sd1", "gelu": "sd2"}
_DEFAULT_SCHEDULER = "DDIMScheduler"
# The diffusers release whose folder layout the configs follow. diffusers reads the version to decide on fixes for
# folders of its early releases (< 0.9: sample sizes, <= 0.5.1: the inpainting model), which must not apply here.
DIFFUSERS_VERSION = "0.30.0"


# ------------------------------------------------------------------------------------------------- atomic outputs


def check_output(output: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuses an existing `output` unless `overwrite`; returns it as a Path."""
    output = Path(output)
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise FileExistsError(f"{output} already exists; choose another --output or pass --overwrite")
    return output


def _replace(tmp: Path, output: Path) -> None:
    """Renames the finished `tmp` onto `output`. A file is replaced atomically; an existing folder is moved aside
    first and removed once the new output is in place."""
    if output.is_dir() and not output.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, old / output.name)
        os.replace(tmp, output)
        shutil.rmtree(old)
        return
    if tmp.is_dir() and (output.exists() or output.is_symlink()):
        output.unlink()  # a folder cannot be renamed onto a file
    os.replace(tmp, output)


def _save_safetensors(arrays: Mapping[str, np.ndarray], file: Path) -> None:
    # safetensors.numpy writes an array's buffer as it lies in memory: a transposed view must be made contiguous.
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(file), metadata=_METADATA)


def _torch_components(states: Mapping[str, nnx.State], dtype) -> dict[str, dict[str, np.ndarray]]:
    """The three states as PyTorch-named, PyTorch-layout numpy arrays, cast to `dtype` when given."""
    target = None if dtype is None else np.dtype(resolve_dtype(dtype))
    out = {}
    for name in COMPONENTS:
        arrays = state_to_torch(states[name])
        out[name] = arrays if target is None else {k: v.astype(target, copy=False) for k, v in arrays.items()}
    return out


def _dtype_name(components: Mapping[str, Mapping[str, np.ndarray]]) -> str:
    names = {str(a.dtype) for arrays in components.values() for a in arrays.values()}
    return names.pop() if len(names) == 1 else "float32"


# ------------------------------------------------------------------------------------------------------- diffusers


def _pipeline_class(config: ModelConfig) -> str:
    return "StableDiffusionInpaintPipeline" if config.is_inpainting else "StableDiffusionPipeline"


def _diffusers_configs(config: ModelConfig, scheduler_class: str, dtype_name: str) -> dict[str, dict[str, Any]]:
    """The `config.json` of each component folder, `scheduler_config.json` and `model_index.json`."""
    text = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        **config.text_encoder.to_dict(),
        "torch_dtype": dtype_name,
    }
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    index = {
        "_class_name": _pipeline_class(config),
        **version,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    return {
        "unet": {"_class_name": "UNet2DConditionModel", **version, **config.unet.to_dict()},
        "vae": {"_class_name": "AutoencoderKL", **version, **config.vae.to_dict()},
        "text_encoder": text,
        "scheduler": {**dict(config.scheduler), "_class_name": scheduler_class},
        "model_index": index,
    }


def export_diffusers(
    config: ModelConfig,
    states: Mapping[str, nnx.State],
    tokenizer,
    output: str | os.PathLike,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a diffusers `StableDiffusionPipeline` folder (`StableDiffusionInpaintPipeline` for 9 input channels).

    `diffusers.StableDiffusionPipeline.from_pretrained(output)` loads it with no hub access: there is no safety
    checker or feature extractor (`requires_safety_checker` false). The scheduler is `config.scheduler` under its own
    `_class_name` (DDIMScheduler when it names none).

    Args:
      config: the model's configuration.
      states: "text_encoder", "unet", "vae" -> parameter states (as `load_components` returns them).
      tokenizer: saved with its own `save_pretrained`.
      output: the folder to write.
      dtype: "float32", "float16" or "bfloat16"; None keeps the states' dtype.
      overwrite: replace an existing `output` (only once the new folder is complete).

    Returns:
      The output path.
    """
    output = check_output(output, overwrite=overwrite)
    components = _torch_components(states, dtype)
    components["text_encoder"] = clip_state_dict_for_torch(components["text_encoder"])
    scheduler_class = config.scheduler.get("_class_name", _DEFAULT_SCHEDULER)
    configs = _diffusers_configs(config, scheduler_class, _dtype_name(components))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        for name in COMPONENTS:
            (tmp / name).mkdir()
            _save_safetensors(components[name], tmp / name / _WEIGHT_FILES[name])
            (tmp / name / "config.json").write_text(json.dumps(configs[name], indent=2))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"], indent=2))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "model_index.json").write_text(json.dumps(configs["model_index"], indent=2))
        _replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


# ----------------------------------------------------------------------------------------------------- single file


def single_file_model_type(config: ModelConfig) -> str:
    """The `single_file.MODEL_TYPES` layout a model is written in: sd1 / sd2 from the text encoder, `_inpainting`
    from the U-Net's 9 input channels.

    Raises:
      ValueError: a model the original layout cannot hold (another activation, input channel count, or a U-Net
        whose cross-attention width is not the text encoder's).
    """
    act = config.text_encoder.hidden_act
    if act not in _LAYOUT_OF_ACTIVATION:
        raise ValueError(
            f"a text encoder with hidden_act={act!r} has no original single-file layout (quick_gelu: SD 1.x CLIP, "
            "gelu: SD 2.x OpenCLIP); export to diffusers instead"
        )
    if config.unet.in_channels not in (4, 9):
        raise ValueError(
            f"a U-Net with {config.unet.in_channels} input channels has no original single-file layout "
            "(4: text-to-image, 9: inpainting); export to diffusers instead"
        )
    if config.unet.cross_attention_dim != config.text_encoder.hidden_size:
        raise ValueError(
            f"the U-Net's cross-attention width {config.unet.cross_attention_dim} is not the text encoder's width "
            f"{config.text_encoder.hidden_size}: not a Stable Diffusion single file"
        )
    layout = _LAYOUT_OF_ACTIVATION[act]
    return layout + "_inpainting" if config.is_inpainting else layout


def _loader_model_type(config: ModelConfig, model_type: str) -> str:
    """The `load_components(model_type=...)` that reads the file back with the model's prediction type."""
    if model_type.startswith("sd1"):
        return "sd15_inpainting" if config.is_inpainting else "sd15"
    if config.is_inpainting:
        return "sd21_inpainting"
    return "sd21_768_v" if config.prediction_type == "v_prediction" else "sd21_base"


def _torch_shapes(config: ModelConfig) -> dict[str, dict[str, np.ndarray]]:
    """Stand-ins of no memory with each PyTorch-named weight's shape: all that config inference reads."""
    out = {}
    for name, (_, abstract) in abstract_components(config).items():
        out[name] = {
            torch_name(path): flax_to_torch_layout(path[-1], np.broadcast_to(np.int8(0), v.get_value().shape))
            for path, v in nnx.to_flat_state(abstract)
        }
    return out


def single_file_load_kwargs(config: ModelConfig) -> dict[str, Any]:
    """What `load_components(file, **kwargs)` needs to rebuild `config` from the single file written for it.

    A single file holds weights only: its reader infers sizes from the shapes and takes the rest (head counts,
    sample size, norms, the VAE scaling factor, ...) from the standard Stable Diffusion values. This gives, as
    `overrides`, every config entry that differs from what the reader infers, and the `model_type` that gives the
    prediction type. The scheduler and tokenizer come from that model type's defaults.
    """
    model_type = single_file_model_type(config)
    shapes = _torch_shapes(config)
    overrides: dict[str, dict[str, Any]] = {}
    try:
        inferred = single_file.infer_configs(shapes, model_type)
    except CheckpointError:
        # Widths that are not multiples of 64 (tiny models): the reader cannot guess the head counts at all.
        overrides = {
            "unet": {"attention_head_dim": config.unet.to_dict()["attention_head_dim"]},
            "text_encoder": {"num_attention_heads": config.text_encoder.num_attention_heads},
        }
        inferred = single_file.infer_configs(shapes, model_type, overrides=overrides)
    for name, cls in _CONFIG_CLASSES.items():
        want, got = getattr(config, name), cls.from_dict(inferred[name])
        for field in dataclasses.fields(cls):
            value = getattr(want, field.name)
            if value != getattr(got, field.name):
                overrides.setdefault(name, {})[field.name] = list(value) if isinstance(value, tuple) else value
    return {"model_type": _loader_model_type(config, model_type), "overrides": overrides}


def original_state_dict(
    config: ModelConfig, states: Mapping[str, nnx.State], *, dtype: str | None = None
) -> dict[str, np.ndarray]:
    """The model as an original-layout single-file state dict (see `single_file.join_original`).

    The result is read back with the converter (`detect_model_type`, `split_original`) before it is returned, so a
    model whose weights the file would not give back exactly is refused here rather than written.

    Raises:
      ValueError: a topology the original layout cannot express, saying why.
    """
    model_type = single_file_model_type(config)
    components = _torch_components(states, dtype)
    state_dict = single_file.join_original(components, model_type)
    try:
        detected = single_file.detect_model_type(state_dict)
        back = single_file.split_original(state_dict, detected, use_ema=False)
    except ValueError as e:
        raise ValueError(f"the model cannot be written as an original single file: {e}") from None
    if detected != model_type or any(
        sorted(back[n]) != sorted(components[n]) or any(back[n][k].shape != components[n][k].shape for k in back[n])
        for n in COMPONENTS
    ):
        raise ValueError(f"the model cannot be written as an original single file: it would read back as {detected}")
    return state_dict


def export_single_file(
    config: ModelConfig,
    states: Mapping[str, nnx.State],
    output: str | os.PathLike,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    log=print,
) -> Path:
    """Writes one original-layout (CompVis / LDM) `.safetensors` file.

    SD 1.x topology: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.text_model.*`;
    SD 2.x topology (a `gelu` text encoder): `cond_stage_model.model.*` in the OpenCLIP layout. What the file cannot
    record (head counts, prediction type, ...) is logged as the `load_components` arguments that read it back.

    Args:
      config, states: the model (as `load_components` returns them).
      output: the `.safetensors` file to write.
      dtype: "float32", "float16" or "bfloat16"; None keeps the states' dtype.
      overwrite: replace an existing `output`.
      log: receives the note on how to load the file.

    Returns:
      The output path.

    Raises:
      ValueError: a topology the original layout cannot express, or an output name without `.safetensors`.
    """
    output = check_output(output, overwrite=overwrite)
    if output.suffix != ".safetensors":
        raise ValueError(f"{output}: a single file is written as .safetensors; name the output *.safetensors")
    state_dict = original_state_dict(config, states, dtype=dtype)
    kwargs = single_file_load_kwargs(config)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{output.name}.partial-", suffix=".safetensors", dir=output.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        _save_safetensors(state_dict, tmp)
        _replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Only the 768-v model type is not what a reader detects by itself.
    if kwargs["overrides"] or kwargs["model_type"] == "sd21_768_v":
        overrides = f" and overrides={json.dumps(kwargs['overrides'])}" if kwargs["overrides"] else ""
        log(f"note: {output.name} holds weights only; read it back with model_type={kwargs['model_type']}{overrides}")
    return output


# ------------------------------------------------------------------------------------------------------ one call


def export(
    model: str | os.PathLike | None,
    output: str | os.PathLike,
    *,
    format: str = "diffusers",
    dtype: str = "float32",
    overwrite: bool = False,
    log=print,
) -> Path:
    """Loads `model` (anything `load_components` reads; None: the default shapes64 model) and writes it as `format`.

    The arguments are checked before the model is loaded.
    """
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    resolve_dtype(dtype)
    output = check_output(output, overwrite=overwrite)
    if format == "single_file" and output.suffix != ".safetensors":
        raise ValueError(f"{output}: a single file is written as .safetensors; name the output *.safetensors")
    if model is None:
        log("note: no model given: exporting the default shapes64 model")
    elif not str(model).startswith(RANDOM_PREFIX) and not Path(model).exists():
        raise LoadError(f"{model}: no such file or folder")
    config, states, tokenizer = load_components(model, dtype, log=log)
    if format == "diffusers":
        return export_diffusers(config, states, tokenizer, output, overwrite=overwrite)
    return export_single_file(config, states, output, overwrite=overwrite, log=log)


__all__ = [
    "FORMATS",
    "export",
    "export_diffusers",
    "export_single_file",
    "original_state_dict",
    "single_file_load_kwargs",
    "single_file_model_type",
]
