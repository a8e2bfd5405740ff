"""Converting any supported PyTorch source into a converted sd_jax folder."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from sd_jax import checkpoint
from sd_jax.loading import load_components


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str = "float32",
    model_type: str = "auto",
    bpe_vocab: str | None = None,
    use_ema: bool = True,
    overwrite: bool = False,
    overrides: dict | None = None,
    log=print,
) -> Path:
    """Converts a diffusers folder or an original single file into a converted folder at `output`.

    The folder is written under a temporary name beside `output` and renamed when complete; an existing
    `output` is refused unless `overwrite`.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; choose another --output or remove it")
    config, states, tokenizer = load_components(
        source, dtype, model_type=model_type, bpe_vocab=bpe_vocab, use_ema=use_ema, overrides=overrides, log=log
    )
    states = jax.device_get(states)
    return checkpoint.save_converted(output, config, states, tokenizer, overwrite=overwrite)
