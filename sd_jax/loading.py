"""`load()`: one entry point for converted folders, diffusers folders and original single files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flax import nnx

from sd_jax import checkpoint
from sd_jax.config import PRESETS, SD1_PAD_TOKEN, SD2_PAD_TOKEN, SD_SCHEDULER, ModelConfig, preset
from sd_jax.convert import single_file
from sd_jax.convert.params import ConversionError, state_from_torch
from sd_jax.convert.torch_files import CheckpointError, read_checkpoint, read_state_dict
from sd_jax.models import COMPONENTS, abstract_components, random_components, resolve_dtype
from sd_jax.modules.clip_text import CLIPTextConfig, clip_state_dict_for_flax
from sd_jax.modules.unet import UNetConfig
from sd_jax.modules.vae import VAEConfig
from sd_jax.tokenizer import load_tokenizer

# The model `load()` gives when no path is given: the shapes64 preset trained on 64x64 shapes (configs/shapes64.py),
# shipped inside the package as a converted folder.
DEFAULT_MODEL = Path(__file__).parent / "assets" / "shapes64"
# `random:NAME`: the preset NAME with random weights (tests, benchmarks, trying sd_jax without a checkpoint).
RANDOM_PREFIX = "random:"

# --model_type for single files: which preset's schedule, tokenizer padding and sample size to use.
MODEL_TYPES = ("auto", "sd15", "sd15_inpainting", "sd21_base", "sd21_768_v", "sd21_inpainting")
_FAMILY = {
    "sd15": "sd1",
    "sd15_inpainting": "sd1_inpainting",
    "sd21_base": "sd2",
    "sd21_768_v": "sd2",
    "sd21_inpainting": "sd2_inpainting",
}
_DETECTED = {
    "sd1": "sd15",
    "sd1_inpainting": "sd15_inpainting",
    "sd2": "sd21_base",
    "sd2_inpainting": "sd21_inpainting",
}

# Weight file names inside a diffusers component folder, in order of preference.
_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}


class LoadError(ValueError):
    """A model path that cannot be loaded; the message says why in one line."""


def _component_weights(folder: Path, name: str) -> dict[str, np.ndarray]:
    """All tensors of one diffusers component folder (single file, sharded index, or an fp16 variant)."""
    candidates = []
    for base in _WEIGHT_FILES[name]:
        stem, ext = base.rsplit(".", 1)
        candidates += [base, f"{base}.index.json", f"{stem}.fp16.{ext}", f"{stem}.fp16.{ext}.index.json"]
    for candidate in candidates:
        file = folder / candidate
        if not file.is_file():
            continue
        if candidate.endswith(".index.json"):
            shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
            out = {}
            for shard in shards:
                out.update(read_state_dict(folder / shard))
            return out
        return read_state_dict(file)
    raise LoadError(f"{folder}: no weights found (looked for {', '.join(_WEIGHT_FILES[name])})")


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise LoadError(f"{file} is missing")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{file}: not valid JSON ({e})") from None


def convert_diffusers_folder(path: Path, dtype) -> tuple[ModelConfig, dict[str, nnx.State], object]:
    """Reads a diffusers `StableDiffusionPipeline` folder (hub layout or `save_pretrained`'s)."""
    text_config = CLIPTextConfig.from_dict(_read_json(path / "text_encoder" / "config.json"))
    unet_config = UNetConfig.from_dict(_read_json(path / "unet" / "config.json"))
    vae_config = VAEConfig.from_dict(_read_json(path / "vae" / "config.json"))
    scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
    tokenizer = load_tokenizer(path / "tokenizer")
    config = ModelConfig(
        name=path.name,
        text_encoder=text_config,
        unet=unet_config,
        vae=vae_config,
        scheduler=scheduler,
        pad_token=str(tokenizer.pad_token),
    )
    weights = {name: _component_weights(path / name, name) for name in COMPONENTS}
    weights["text_encoder"] = clip_state_dict_for_flax(weights["text_encoder"])
    return config, _fill(config, weights, dtype), tokenizer


def convert_single_file(
    path: Path,
    dtype,
    *,
    model_type: str = "auto",
    bpe_vocab: str | None = None,
    use_ema: bool = True,
    overrides: dict | None = None,
    log=print,
) -> tuple[ModelConfig, dict[str, nnx.State], object]:
    """Reads an original Stable Diffusion single file (`.safetensors` or `.ckpt`).

    Sizes come from the tensor shapes; what shapes cannot tell (head counts) is the standard Stable Diffusion
    choice unless `overrides` ({"unet": {...}, "text_encoder": {...}, "vae": {...}} config entries) says otherwise.
    """
    if model_type not in MODEL_TYPES:
        raise LoadError(f"--model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    state_dict, extras = read_checkpoint(path)
    family = single_file.detect_model_type(state_dict)
    if model_type == "auto":
        model_type = _DETECTED[family]
        if family == "sd2":
            v_prediction, why = single_file.sd2_v_prediction(path, extras.get("global_step"))
            model_type = "sd21_768_v" if v_prediction else "sd21_base"
            log(f"note: {path.name}: {'v-prediction' if v_prediction else 'epsilon'} ({model_type}): {why}")
    elif _FAMILY[model_type] != family:
        raise LoadError(f"{path}: --model_type={model_type} expects a {_FAMILY[model_type]} checkpoint, found {family}")
    components = single_file.split_original(state_dict, family, use_ema=use_ema)
    del state_dict
    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    if model_type == "sd21_768_v":
        overrides.setdefault("unet", {}).setdefault("sample_size", 96)
    configs = single_file.infer_configs(components, family, overrides=overrides)
    scheduler = dict(preset(model_type).scheduler) if model_type != "sd21_inpainting" else dict(SD_SCHEDULER)
    pad_token = SD2_PAD_TOKEN if family.startswith("sd2") else SD1_PAD_TOKEN
    config = ModelConfig(
        name=f"{path.stem} ({model_type})",
        text_encoder=CLIPTextConfig.from_dict(configs["text_encoder"]),
        unet=UNetConfig.from_dict(configs["unet"]),
        vae=VAEConfig.from_dict(configs["vae"]),
        scheduler=scheduler,
        pad_token=pad_token,
    )
    tokenizer = load_tokenizer(None, bpe_path=bpe_vocab, pad_token=pad_token)
    return config, _fill(config, components, dtype), tokenizer


def _fill(config: ModelConfig, weights: dict[str, dict[str, np.ndarray]], dtype) -> dict[str, nnx.State]:
    abstract = abstract_components(config, dtype)
    return {
        name: state_from_torch(abstract[name][1], weights[name], dtype=resolve_dtype(dtype), component=name)
        for name in COMPONENTS
    }


def load_components(
    path: str | os.PathLike | None,
    dtype="float32",
    *,
    model_type: str = "auto",
    bpe_vocab: str | None = None,
    use_ema: bool = True,
    overrides: dict | None = None,
    log=print,
) -> tuple[ModelConfig, dict[str, nnx.State], object]:
    """(config, parameter states, tokenizer) of a model path; see `load`."""
    dtype = resolve_dtype(dtype)
    try:
        if path is None:
            if not checkpoint.is_converted(DEFAULT_MODEL):
                raise LoadError(
                    f"the default model is missing from {DEFAULT_MODEL} (reinstall sd_jax, or pass a model path "
                    f"or {RANDOM_PREFIX}tiny)"
                )
            path = DEFAULT_MODEL
        elif isinstance(path, str) and path.startswith(RANDOM_PREFIX):
            return random_model(path.removeprefix(RANDOM_PREFIX), dtype, bpe_vocab=bpe_vocab)
        path = Path(path)
        if not path.exists():
            raise LoadError(f"{path}: no such file or folder")
        if path.is_dir():
            if checkpoint.is_converted(path):
                config, states = checkpoint.read_converted(path, dtype)
                return config, states, load_tokenizer(path / "tokenizer", pad_token=config.pad_token)
            if (path / "model_index.json").is_file() or (path / "unet").is_dir():
                return convert_diffusers_folder(path, dtype)
            raise LoadError(f"{path}: neither a converted sd_jax folder nor a diffusers folder (no model_index.json)")
        return convert_single_file(
            path, dtype, model_type=model_type, bpe_vocab=bpe_vocab, use_ema=use_ema, overrides=overrides, log=log
        )
    except (ConversionError, CheckpointError, LoadError):
        raise
    except (KeyError, TypeError) as e:
        raise LoadError(f"{path}: malformed model ({type(e).__name__}: {e})") from None


def random_model(name: str, dtype="float32", *, bpe_vocab: str | None = None):
    """(config, random parameter states, BPE tokenizer) of the preset `name` (`random:NAME` in `load`)."""
    if name not in PRESETS:
        choices = ", ".join(RANDOM_PREFIX + p for p in PRESETS)
        raise LoadError(f"{RANDOM_PREFIX}{name}: no such preset; random-weight models are {choices}")
    config = preset(name)
    tokenizer = load_tokenizer(None, bpe_path=bpe_vocab, pad_token=config.pad_token)
    return config, random_components(config, resolve_dtype(dtype)), tokenizer


def load(path: str | os.PathLike | None = None, dtype="float32", **kwargs):
    """Loads a model for generation.

    Args:
      path: a converted sd_jax folder, a diffusers folder, an original single file (`.safetensors` / `.ckpt`,
        converted in memory), `random:NAME` for the preset NAME with random weights (e.g. `random:tiny`, the small
        test model), or None for the default model: shapes64, trained on 64x64 images of coloured shapes
        ("a red circle on a blue background"), shipped with sd_jax.
      dtype: "float32", "bfloat16" or "float16": the parameter and compute dtype.
      **kwargs: `model_type`, `bpe_vocab`, `use_ema`, `overrides` for single files (see `convert_single_file`);
        `mesh` (default: all local devices) and `micro_batch` for the pipeline.

    Returns:
      A `StableDiffusionPipeline`.
    """
    from sd_jax.pipeline import StableDiffusionPipeline

    pipeline_kwargs = {k: kwargs.pop(k) for k in ("mesh", "micro_batch") if k in kwargs}
    config, states, tokenizer = load_components(path, dtype, **kwargs)
    if path is None:
        source = str(DEFAULT_MODEL)
    elif isinstance(path, str) and path.startswith(RANDOM_PREFIX):
        source = None  # no file: the metadata names the preset and gives no hash
    else:
        source = str(path)
    return StableDiffusionPipeline(
        config, states, tokenizer, dtype=resolve_dtype(dtype), source=source, **pipeline_kwargs
    )


__all__ = ["load", "load_components", "random_model", "LoadError", "MODEL_TYPES", "DEFAULT_MODEL", "RANDOM_PREFIX"]
