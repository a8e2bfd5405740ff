"""Building the three networks of a `ModelConfig`: abstractly (for loading) or with random weights (for tests)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
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


def _constructors(config: ModelConfig, dtype) -> dict[str, Callable[[nnx.Rngs], nnx.Module]]:
    return {
        "text_encoder": lambda rngs: CLIPTextModel(config.text_encoder, dtype=dtype, rngs=rngs),
        "unet": lambda rngs: UNet2DConditionModel(config.unet, dtype=dtype, rngs=rngs),
        "vae": lambda rngs: AutoencoderKL(config.vae, dtype=dtype, rngs=rngs),
    }


def abstract_components(config: ModelConfig, dtype=jnp.float32) -> dict[str, tuple[nnx.GraphDef, nnx.State]]:
    """Graph definitions and shape-only states of the three networks; nothing is allocated."""
    out = {}
    for name, make in _constructors(config, resolve_dtype(dtype)).items():
        model = nnx.eval_shape(lambda make=make: make(nnx.Rngs(0)))
        out[name] = nnx.split(model)
    return out


def random_components(config: ModelConfig, dtype=jnp.float32, seed: int = 0) -> dict[str, nnx.State]:
    """Randomly initialised states of the three networks (for tests and the untrained default model)."""
    dtype = resolve_dtype(dtype)
    states = {}
    for i, (name, make) in enumerate(_constructors(config, dtype).items()):

        @jax.jit
        def init(make=make, i=i):
            return nnx.split(make(nnx.Rngs(seed * 7919 + i)))[1]

        states[name] = init()
    return states
