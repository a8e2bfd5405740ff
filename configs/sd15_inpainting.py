"""Stable Diffusion 1.5 inpainting: the SD 1.5 networks with a 9-channel U-Net input (latents, mask, masked image).

python scripts/convert.py --checkpoint=sd-v1-5-inpainting.ckpt --model_type=sd15_inpainting --output=models/sd15i
"""

import dataclasses

from sd_jax.configs import sd15

from sd_jax.config import ModelConfig


def get_config() -> ModelConfig:
    base = sd15.get_config()
    return dataclasses.replace(base, name="sd15_inpainting", unet=dataclasses.replace(base.unet, in_channels=9))
