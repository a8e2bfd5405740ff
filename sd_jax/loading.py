"""`load()`: one entry point for every kind of model path; it only decides which reader reads it.

    None                 the default model, a converted folder shipped in sd_jax/assets/
    random:NAME          the preset NAME with random weights (`random_model`)
    a converted folder   `checkpoint.read_converted` (its model_index.json says "format": "sd_jax")
    a diffusers folder   `convert.readers.convert_diffusers_folder` (a model_index.json or a unet/ folder)
    a file               `convert.readers.convert_single_file` (.safetensors / .ckpt in the original layout)

Each gives (config, parameter states, tokenizer), which `load` wraps in a pipeline.
"""

from __future__ import annotations

import os
from pathlib import Path

from flax import nnx

from sd_jax import checkpoint, compile_cache
from sd_jax.config import PRESETS, ModelConfig, preset
from sd_jax.convert.params import ConversionError
from sd_jax.convert.readers import MODEL_TYPES, LoadError, convert_diffusers_folder, convert_single_file
from sd_jax.convert.torch_files import CheckpointError
from sd_jax.models import random_components, resolve_dtype
from sd_jax.tokenizer import load_tokenizer

# The model `load()` gives when no path is given: the shapes64 preset trained on 64x64 shapes (configs/shapes64.py),
# shipped inside the package as a converted folder.
DEFAULT_MODEL = Path(__file__).parent / "assets" / "shapes64"
# `random:NAME`: the preset NAME with random weights (tests, benchmarks, trying sd_jax without a checkpoint).
RANDOM_PREFIX = "random:"


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
      **kwargs: `model_type` (one of MODEL_TYPES), `bpe_vocab`, `use_ema`, `overrides` for single files (see
        `sd_jax.convert.readers.convert_single_file`);
        `mesh` (default: all local devices), `micro_batch`, and `lora_dir` / `embeddings_dir` (the folders prompts'
        `<lora:NAME:WEIGHT>` tags and textual-inversion names refer to) for the pipeline.

    Returns:
      A `StableDiffusionPipeline`.

    JAX's persistent compilation cache is turned on (`sd_jax.compile_cache.enable`: SD_JAX_COMPILE_CACHE=0 turns
    it off) unless JAX was given a cache folder already or told to use none.
    """
    from sd_jax.pipeline import StableDiffusionPipeline

    compile_cache.enable()

    pipeline_keys = ("mesh", "micro_batch", "lora_dir", "embeddings_dir")
    pipeline_kwargs = {k: kwargs.pop(k) for k in pipeline_keys if k in kwargs}
    for key in ("lora_dir", "embeddings_dir"):  # a wrong folder is reported before the weights are read
        if pipeline_kwargs.get(key) is not None and not Path(pipeline_kwargs[key]).is_dir():
            raise LoadError(f"--{key} {pipeline_kwargs[key]}: no such folder")
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
