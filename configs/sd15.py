"""Stable Diffusion 1.5 (and 1.x): CLIP ViT-L/14 text encoder, 860M-parameter U-Net, epsilon prediction.

python scripts/convert.py --checkpoint=v1-5-pruned-emaonly.safetensors --model_type=sd15 --output=models/sd15
"""

from sd_jax.config import SD1_PAD_TOKEN, SD_SCHEDULER, ModelConfig
from sd_jax.modules.clip_text import CLIPTextConfig
from sd_jax.modules.unet import UNetConfig
from sd_jax.modules.vae import VAEConfig

SD1_TEXT_ENCODER = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)


def get_config() -> ModelConfig:
    return ModelConfig(
        name="sd15",
        text_encoder=SD1_TEXT_ENCODER,
        unet=UNetConfig(),
        vae=VAEConfig(),
        scheduler=dict(SD_SCHEDULER),
        family="sd1",
        pad_token=SD1_PAD_TOKEN,
    )
