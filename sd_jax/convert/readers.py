"""Readers of the PyTorch formats: a diffusers folder or an original single file -> (config, states, tokenizer).

    convert_diffusers_folder   a `StableDiffusionPipeline` folder (hub layout or `save_pretrained`'s): each
                               component's config.json and weights, the scheduler config, the tokenizer
    convert_single_file        an original (CompVis / Stability) `.safetensors` / `.ckpt`: the layout detected from
                               the keys, sizes from the shapes, schedule and tokenizer from the matching preset

Both fill the abstract parameter tree directly from the PyTorch arrays, every key and shape checked
(`params.state_from_torch`), and both decide the model's family (SD 1 / SD 2) here, once. Host memory stays near
the size of the loaded weights: `.safetensors` tensors are read one at a time as they are placed, and a single file's
tensors, which the layout conversion needs together, are cast to the loaded dtype as they are read and dropped as
they are placed.
"""

from __future__ import annotations

import json
from collections import ChainMap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import nnx

from sd_jax.config import PAD_TOKENS, SD_SCHEDULER, ModelConfig, family_of_pad_token, preset
from sd_jax.convert import single_file
from sd_jax.convert.params import TensorView, clip_state_dict_for_flax, state_from_torch
from sd_jax.convert.torch_files import read_checkpoint, read_state_dict
from sd_jax.models import COMPONENTS, abstract_components, resolve_dtype
from sd_jax.modules.clip_text import CLIPTextConfig
from sd_jax.modules.unet import UNetConfig
from sd_jax.modules.vae import VAEConfig
from sd_jax.tokenizer import load_tokenizer

# --model_type for single files: which preset's schedule, tokenizer padding and sample size to use.
MODEL_TYPES = ("auto", "sd15", "sd15_inpainting", "sd21_base", "sd21_768_v", "sd21_inpainting")
# Each --model_type's layout (`single_file.MODEL_TYPES`), and the --model_type a detected layout defaults to.
_LAYOUT_OF_TYPE = {
    "sd15": "sd1",
    "sd15_inpainting": "sd1_inpainting",
    "sd21_base": "sd2",
    "sd21_768_v": "sd2",
    "sd21_inpainting": "sd2_inpainting",
}
_TYPE_OF_LAYOUT = {
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


def _fill(
    config: ModelConfig, weights: dict[str, Mapping[str, np.ndarray]], dtype, *, consume: bool = False
) -> dict[str, nnx.State]:
    """Each component's abstract parameter tree filled from its PyTorch-named arrays (popped from `weights`' dicts
    as they are placed with `consume`)."""
    abstract = abstract_components(config, dtype)
    return {
        name: state_from_torch(
            abstract[name][1], weights[name], dtype=resolve_dtype(dtype), component=name, consume=consume
        )
        for name in COMPONENTS
    }


# ------------------------------------------------------------------------------------------------- diffusers folder


def _component_weights(folder: Path, name: str) -> Mapping[str, np.ndarray]:
    """All tensors of one diffusers component folder (single file, sharded index, or an fp16 variant); a
    `.safetensors` file's are read when they are looked up."""
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
            return ChainMap(*(read_state_dict(folder / shard) for shard in shards))
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
    """Reads a diffusers `StableDiffusionPipeline` folder (hub layout or `save_pretrained`'s).

    A diffusers folder does not name its family; its tokenizer's pad token tells it (OpenCLIP's "!" for SD 2.x).
    """
    text_config = CLIPTextConfig.from_dict(_read_json(path / "text_encoder" / "config.json"))
    unet_config = UNetConfig.from_dict(_read_json(path / "unet" / "config.json"))
    vae_config = VAEConfig.from_dict(_read_json(path / "vae" / "config.json"))
    scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
    tokenizer = load_tokenizer(path / "tokenizer")
    pad_token = str(tokenizer.pad_token)
    config = ModelConfig(
        name=path.name,
        text_encoder=text_config,
        unet=unet_config,
        vae=vae_config,
        scheduler=scheduler,
        family=family_of_pad_token(pad_token),
        pad_token=pad_token,
    )
    weights = {name: _component_weights(path / name, name) for name in COMPONENTS}
    weights["text_encoder"] = clip_state_dict_for_flax(weights["text_encoder"])
    return config, _fill(config, weights, dtype), tokenizer


# ------------------------------------------------------------------------------------------------------ single file


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
    The family is the detected layout's (OpenAI CLIP: sd1, OpenCLIP: sd2); an SD 2.x file's prediction type is
    decided by `single_file.sd2_v_prediction` unless `model_type` names it, and the decision is passed to `log`.
    """
    if model_type not in MODEL_TYPES:
        raise LoadError(f"--model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    state_dict, extras = read_checkpoint(path)
    layout = single_file.detect_model_type(state_dict)
    if model_type == "auto":
        model_type = _TYPE_OF_LAYOUT[layout]
        if layout == "sd2":
            v_prediction, why = single_file.sd2_v_prediction(path, extras.get("global_step"))
            model_type = "sd21_768_v" if v_prediction else "sd21_base"
            log(f"note: {path.name}: {'v-prediction' if v_prediction else 'epsilon'} ({model_type}): {why}")
    elif _LAYOUT_OF_TYPE[model_type] != layout:
        raise LoadError(
            f"{path}: --model_type={model_type} expects a {_LAYOUT_OF_TYPE[model_type]} checkpoint, found {layout}"
        )
    # split_original holds the tensors it uses together: read in the loaded dtype, a float32 file loaded as bfloat16
    # never has its float32 copy on the host.
    components = single_file.split_original(TensorView(state_dict, dtype=resolve_dtype(dtype)), layout, use_ema=use_ema)
    del state_dict
    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    if model_type == "sd21_768_v":
        overrides.setdefault("unet", {}).setdefault("sample_size", 96)
    configs = single_file.infer_configs(components, layout, overrides=overrides)
    scheduler = dict(preset(model_type).scheduler) if model_type != "sd21_inpainting" else dict(SD_SCHEDULER)
    family = layout.removesuffix("_inpainting")
    config = ModelConfig(
        name=f"{path.stem} ({model_type})",
        text_encoder=CLIPTextConfig.from_dict(configs["text_encoder"]),
        unet=UNetConfig.from_dict(configs["unet"]),
        vae=VAEConfig.from_dict(configs["vae"]),
        scheduler=scheduler,
        family=family,
        pad_token=PAD_TOKENS[family],
    )
    tokenizer = load_tokenizer(None, bpe_path=bpe_vocab, pad_token=config.pad_token)
    return config, _fill(config, components, dtype, consume=True), tokenizer
