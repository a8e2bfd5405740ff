"""Stable Diffusion 2.1 base (512 px): OpenCLIP ViT-H/14 text encoder (penultimate layer), epsilon prediction.

python scripts/convert.py --checkpoint=v2-1_512-ema-pruned.safetensors --model_type=sd21_base --output=models/sd21b
"""

from sd_jax.config import SD2_PAD_TOKEN, SD_SCHEDULER, ModelConfig
from sd_jax.modules.clip_text import CLIPTextConfig
from sd_jax.modules.unet import UNetConfig
from sd_jax.modules.vae import VAEConfig

# OpenCLIP ViT-H/14's text tower has 24 blocks; SD 2 reads the penultimate one, so the last block is dropped.
SD2_TEXT_ENCODER = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
    pad_token_id=0,
)

SD2_UNET = UNetConfig(
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    upcast_attention=False,
)


def get_config() -> ModelConfig:
    return ModelConfig(
        name="sd21_base",
        text_encoder=SD2_TEXT_ENCODER,
        unet=SD2_UNET,
        vae=VAEConfig(),
        scheduler=dict(SD_SCHEDULER),
        family="sd2",
        pad_token=SD2_PAD_TOKEN,
    )
