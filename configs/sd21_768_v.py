"""Stable Diffusion 2.1 (768 px, v-prediction): the SD 2.1 networks, upcast attention, v-prediction schedule.

python scripts/convert.py --checkpoint=v2-1_768-ema-pruned.safetensors --model_type=sd21_768_v --output=models/sd21
"""

import dataclasses

from sd_jax.configs.sd21_base import SD2_TEXT_ENCODER, SD2_UNET

from sd_jax.config import SD2_PAD_TOKEN, SD_SCHEDULER, ModelConfig
from sd_jax.modules.vae import VAEConfig


def get_config() -> ModelConfig:
    return ModelConfig(
        name="sd21_768_v",
        text_encoder=SD2_TEXT_ENCODER,
        unet=dataclasses.replace(SD2_UNET, sample_size=96, upcast_attention=True),
        vae=VAEConfig(sample_size=768),
        scheduler={**SD_SCHEDULER, "prediction_type": "v_prediction"},
        family="sd2",
        pad_token=SD2_PAD_TOKEN,
    )
