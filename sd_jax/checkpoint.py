"""The converted-model folder: per-component safetensors of the Flax parameter trees plus JSON configs.

    DIR/model_index.json            {"format": "sd_jax", "version": 1, "name": ..., "dtype": ...}
    DIR/config.json                 the ModelConfig (all three architectures, scheduler, family, pad token)
    DIR/{text_encoder,unet,vae}/params.safetensors   flat `path.to.leaf` -> array
    DIR/tokenizer/                  the tokenizer's own files
    DIR/scheduler/scheduler_config.json               the diffusers scheduler config

A folder is written under a temporary name beside its destination and renamed only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from sd_jax.config import ModelConfig
from sd_jax.convert.params import ConversionError, path_to_name, state_from_flat
from sd_jax.convert.torch_files import CheckpointError, SafetensorsFile, write_safetensors
from sd_jax.models import COMPONENTS, abstract_components

FORMAT = "sd_jax"
VERSION = 1
PARAMS_FILE = "params.safetensors"


def is_converted(path: str | os.PathLike) -> bool:
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def save_converted(
    output: str | os.PathLike, config: ModelConfig, states: dict[str, nnx.State], tokenizer, *, overwrite: bool = False
) -> Path:
    """Writes a converted model folder atomically; refuses to replace an existing path unless `overwrite`."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; choose another --output or remove it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        dtypes = set()
        for name in COMPONENTS:
            (tmp / name).mkdir()
            # Fetched from the device and written one tensor at a time: no host copy of the whole model.
            flat = {path_to_name(p): v.get_value() for p, v in nnx.to_flat_state(states[name])}
            dtypes |= {str(a.dtype) for a in flat.values()}
            write_safetensors(tmp / name / PARAMS_FILE, flat)
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(config.scheduler), indent=2))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        index = {"format": FORMAT, "version": VERSION, "name": config.name, "dtype": ",".join(sorted(dtypes))}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def read_converted(path: str | os.PathLike, dtype=jnp.float32) -> tuple[ModelConfig, dict[str, nnx.State]]:
    """Reads a converted folder's config and parameter states (cast to `dtype`).

    Each tensor is read, cast and placed on the device alone (`SafetensorsFile`, `fill_state`): the host holds no
    second copy of the weights. A folder written before configs named their family gets the one its pad token marks
    (`ModelConfig.from_dict`).
    """
    path = Path(path)
    index = json.loads((path / "model_index.json").read_text())
    if index.get("version") != VERSION:
        raise ConversionError(f"{path}: converted format version {index.get('version')} is not {VERSION}")
    config = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
    abstract = abstract_components(config, dtype)
    states = {}
    for name in COMPONENTS:
        file = path / name / PARAMS_FILE
        try:
            states[name] = state_from_flat(abstract[name][1], SafetensorsFile(file), dtype=dtype, component=name)
        except CheckpointError as e:
            raise ConversionError(f"{file}: cannot read parameters ({e})") from None
    return config, states
