"""A tiny SD-1.x-shaped model (random weights) for tests and for running sd_jax with no checkpoint at hand.

python scripts/txt2img.py --model=random:tiny --prompt="a photo of a cat" --steps=10
"""

from sd_jax.config import SD1_PAD_TOKEN, SD_SCHEDULER, ModelConfig
from sd_jax.modules.clip_text import CLIPTextConfig
from sd_jax.modules.unet import UNetConfig
from sd_jax.modules.vae import VAEConfig


def get_config() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        text_encoder=CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=32,
        ),
        unet=UNetConfig(
            sample_size=8,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=2,
        ),
        vae=VAEConfig(
            block_out_channels=(32, 32, 32, 32),
            layers_per_block=1,
            sample_size=64,
        ),
        scheduler=dict(SD_SCHEDULER),
        family="sd1",
        pad_token=SD1_PAD_TOKEN,
    )
