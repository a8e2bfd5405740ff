"""Tiny random Stable Diffusion models in the real PyTorch formats, for parity and conversion tests.

Every weight, norms and biases included, is drawn at random (diffusers zero-initialises some output layers, and
a parity test on zeros proves nothing), with scales that keep activations of order one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from sd_jax.config import SD2_PAD_TOKEN, ModelConfig, preset
from sd_jax.modules.clip_text import CLIPTextConfig
from sd_jax.modules.unet import UNetConfig
from sd_jax.tokenizer import load_tokenizer


def tiny_config(kind: str = "sd1") -> ModelConfig:
    """The `tiny` preset in the SD 1.x topology, or its SD 2.x (v-prediction) or 9-channel inpainting variant."""
    config = preset("tiny")
    if kind == "sd1":
        return config
    if kind == "sd1_inpainting":
        return dataclasses.replace(config, name="tiny_inpainting", unet=dataclasses.replace(config.unet, in_channels=9))
    if kind == "sd2_v":
        text = dataclasses.replace(
            config.text_encoder,
            hidden_act="gelu",
            hidden_size=64,
            num_attention_heads=4,
            intermediate_size=128,
            pad_token_id=0,
        )
        unet = dataclasses.replace(
            config.unet,
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            upcast_attention=True,
        )
        scheduler = {**config.scheduler, "prediction_type": "v_prediction"}
        return dataclasses.replace(
            config,
            name="tiny_sd2_v",
            text_encoder=text,
            unet=unet,
            scheduler=scheduler,
            family="sd2",
            pad_token=SD2_PAD_TOKEN,
        )
    raise ValueError(kind)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrites every parameter with random values of a sensible scale, in place."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim == 1 and ("norm" in name or "ln" in name) and leaf == "weight":
            param.copy_(1.0 + 0.1 * noise)
        elif param.ndim == 1:
            param.copy_(0.05 * noise)
        else:
            fan_in = int(np.prod(param.shape[1:])) if param.ndim > 1 else param.shape[0]
            scale = 1.0 / np.sqrt(fan_in)
            if "embedding" in name:
                scale = 0.5
            param.copy_(scale * noise)
    return module.eval()


def torch_components(config: ModelConfig, seed: int = 0) -> dict:
    """Random diffusers / transformers modules with the architecture of `config`."""
    import diffusers
    import transformers

    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.text_encoder.to_dict()))
    unet = diffusers.UNet2DConditionModel(**config.unet.to_dict())
    vae = diffusers.AutoencoderKL(**config.vae.to_dict())
    return {
        "text_encoder": randomize_(text, seed),
        "unet": randomize_(unet, seed + 1),
        "vae": randomize_(vae, seed + 2),
    }


def diffusers_pipeline(config: ModelConfig, seed: int = 0):
    """A diffusers StableDiffusionPipeline (or inpainting pipeline) with random weights and the real CLIP BPE."""
    import diffusers

    parts = torch_components(config, seed)
    scheduler = diffusers.DDIMScheduler.from_config(dict(config.scheduler))
    tokenizer = load_tokenizer(None, pad_token=config.pad_token)
    cls = diffusers.StableDiffusionInpaintPipeline if config.is_inpainting else diffusers.StableDiffusionPipeline
    return cls(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=tokenizer,
        unet=parts["unet"],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_diffusers_pipeline(config: ModelConfig, folder: Path, seed: int = 0):
    """Saves a random pipeline with `save_pretrained` (safetensors) and returns it."""
    pipe = diffusers_pipeline(config, seed)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe


__all__ = [
    "tiny_config",
    "randomize_",
    "torch_components",
    "diffusers_pipeline",
    "save_diffusers_pipeline",
    "CLIPTextConfig",
    "UNetConfig",
]
