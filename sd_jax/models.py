"""Building the three networks of a `ModelConfig`: abstractly (for loading) or with random weights (for tests)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sd_jax.config import ModelConfig
from sd_jax.modules.clip_text import CLIPTextModel
from sd_jax.modules.unet import UNet2DConditionModel
from sd_jax.modules.vae import AutoencoderKL

COMPONENTS = ("text_encoder", "unet", "vae")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype:
    """'float32' | 'bfloat16' | 'float16' (or the jnp dtype) -> the jnp dtype; anything else is a ValueError."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    for value in DTYPES.values():
        if jnp.dtype(dtype) == jnp.dtype(value):
            return value
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def dtype_name(dtype) -> str:
    return jnp.dtype(resolve_dtype(dtype)).name


_MODULES = {"text_encoder": CLIPTextModel, "unet": UNet2DConditionModel, "vae": AutoencoderKL}


@functools.lru_cache(maxsize=16)
def _abstract(name: str, component_config, dtype_str: str) -> tuple[nnx.GraphDef, nnx.State]:
    module = _MODULES[name]
    model = nnx.eval_shape(lambda: module(component_config, dtype=jnp.dtype(dtype_str), rngs=nnx.Rngs(0)))
    return nnx.split(model)


def abstract_components(config: ModelConfig, dtype=jnp.float32) -> dict[str, tuple[nnx.GraphDef, nnx.State]]:
    """Graph definitions and shape-only states of the three networks; nothing is allocated (cached: tracing a
    full-size U-Net's constructor takes seconds)."""
    dtype_str = jnp.dtype(resolve_dtype(dtype)).name
    return {name: _abstract(name, getattr(config, name), dtype_str) for name in COMPONENTS}


def random_components(config: ModelConfig, dtype=jnp.float32, seed: int = 0) -> dict[str, nnx.State]:
    """Random states of the three networks (the untrained default model, tests), drawn on the host.

    Kernels are N(0, 1/fan_in), embeddings N(0, 0.02^2), norm scales 1 and biases 0: a network that runs at sane
    activation scales. Drawing with numpy from the abstract tree is instant, where tracing the modules' own
    initialisers costs tens of seconds.
    """
    dtype = resolve_dtype(dtype)
    rng = np.random.default_rng(seed)
    states = {}
    for name, (_, abstract) in abstract_components(config, dtype).items():
        filled = []
        for path, variable in nnx.to_flat_state(abstract):
            shape = variable.get_value().shape
            leaf = path[-1]
            if leaf == "kernel":
                value = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(np.prod(shape[:-1]))
            elif leaf == "embedding":
                value = 0.02 * rng.standard_normal(shape, dtype=np.float32)
            elif leaf == "scale":
                value = np.ones(shape, np.float32)
            else:
                value = np.zeros(shape, np.float32)
            filled.append((path, variable.replace(jnp.asarray(value, dtype))))
        states[name] = nnx.from_flat_state(filled)
    return states
