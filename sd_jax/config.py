"""A whole Stable Diffusion model's configuration: its three networks, its noise schedule, its tokenizer, its family."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from sd_jax.modules.clip_text import CLIPTextConfig
from sd_jax.modules.unet import UNetConfig
from sd_jax.modules.vae import VAEConfig

PRESETS = ("sd15", "sd15_inpainting", "sd21_base", "sd21_768_v", "tiny", "shapes64")

# The noise schedule every Stable Diffusion 1.x / 2.x model was trained with, as its diffusers folders store it.
SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

# SD 1.x pads prompts with the end token; SD 2.x (OpenCLIP) with "!" (id 0).
SD1_PAD_TOKEN = "<|endoftext|>"
SD2_PAD_TOKEN = "!"

# The Stable Diffusion lineages a model can belong to, and the pad token each one's tokenizer uses.
FAMILIES = ("sd1", "sd2")
PAD_TOKENS = {"sd1": SD1_PAD_TOKEN, "sd2": SD2_PAD_TOKEN}


def family_of_pad_token(pad_token: str) -> str:
    """The family a tokenizer's pad token marks: "sd2" for OpenCLIP's "!", else "sd1".

    Only for sources that do not name their family (diffusers folders, converted folders written before the field
    existed); it is called once, when such a source is read.
    """
    return "sd2" if pad_token == SD2_PAD_TOKEN else "sd1"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a model, without its weights.

    Attributes:
      name: a preset name or a free-form description.
      text_encoder, unet, vae: the network architectures.
      scheduler: a diffusers `scheduler_config.json` dict (beta schedule, prediction_type, timestep spacing...).
      family: "sd1" or "sd2", the Stable Diffusion lineage: it chooses the invisible watermark's payload and the
        pad token of a tokenizer built without files of its own (single files, random presets).
      pad_token: the token prompts are padded with.
    """

    name: str
    text_encoder: CLIPTextConfig
    unet: UNetConfig
    vae: VAEConfig
    scheduler: Mapping[str, Any]
    family: str = "sd1"
    pad_token: str = SD1_PAD_TOKEN

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"model family must be one of {', '.join(FAMILIES)}, got {self.family!r}")

    @property
    def prediction_type(self) -> str:
        return self.scheduler.get("prediction_type", "epsilon")

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 9

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "text_encoder": self.text_encoder.to_dict(),
            "unet": self.unet.to_dict(),
            "vae": self.vae.to_dict(),
            "scheduler": dict(self.scheduler),
            "family": self.family,
            "pad_token": self.pad_token,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """The inverse of `to_dict`; a dict without "family" (written before the field existed) takes the family
        its pad token marks."""
        pad_token = d.get("pad_token", SD1_PAD_TOKEN)
        return cls(
            name=d["name"],
            text_encoder=CLIPTextConfig.from_dict(d["text_encoder"]),
            unet=UNetConfig.from_dict(d["unet"]),
            vae=VAEConfig.from_dict(d["vae"]),
            scheduler=dict(d["scheduler"]),
            family=d.get("family") or family_of_pad_token(pad_token),
            pad_token=pad_token,
        )


def preset(name: str) -> ModelConfig:
    """A named preset from `configs/` (installed as `sd_jax.configs`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return importlib.import_module(f"sd_jax.configs.{name}").get_config()
