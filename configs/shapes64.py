"""The default model: a small Stable Diffusion (CLIP text encoder, U-Net, KL VAE) trained from scratch on shapes.

Images are 64x64 (8x8x4 latents): one filled circle, square or triangle of one colour on a plain background of
another, captioned "a {colour} {shape} on a {colour} background" (`sd_jax.shapes`). The trained weights ship in
`sd_jax/assets/shapes64/`; `scripts/train_default_model.sh` reproduces them:

python scripts/train.py --config=shapes64 --component=vae --data=data/shapes --output_dir=runs/shapes64_vae ...
"""

from sd_jax.config import SD1_PAD_TOKEN, SD_SCHEDULER, ModelConfig
from sd_jax.modules.clip_text import CLIPTextConfig
from sd_jax.modules.unet import UNetConfig
from sd_jax.modules.vae import VAEConfig


def get_config() -> ModelConfig:
    return ModelConfig(
        name="shapes64",
        text_encoder=CLIPTextConfig(
            vocab_size=49408,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=64,
        ),
        unet=UNetConfig(
            sample_size=8,
            block_out_channels=(32, 64, 128),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=64,
            attention_head_dim=4,
        ),
        vae=VAEConfig(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        ),
        scheduler=dict(SD_SCHEDULER),
        family="sd1",
        pad_token=SD1_PAD_TOKEN,
    )
