#!/usr/bin/env bash
# Reproduces the shipped default model (sd_jax/assets/shapes64) from nothing: the shapes data, the VAE, a
# decoder-only refinement of it, then the U-Net and the text encoder on cached latents; finally the weights are
# stored as float16 in the package. Every step resumes where it stopped when run again.
#
#   bash scripts/train_default_model.sh [RUNS_DIR]      (default: runs/)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs}
data=$runs/shapes_data

python scripts/make_shapes.py --output_dir="$data" --per_caption=150 --size=64 --seed=0

# 1. The autoencoder, from scratch: L1 + 1e-6 KL (the summed loss is not clipped: --max_grad_norm=1e6); its latent
# scale is measured on the data at the end.
python scripts/train.py --config=shapes64 --component=vae --data="$data" --output_dir="$runs/shapes64_vae" \
  --resolution=64 --random_flip --batch_size=8 --max_steps=2000 --learning_rate=7e-4 --warmup_steps=100 \
  --lr_schedule=cosine --max_grad_norm=1e6 --save_every=250 --log_every=25 --seed=0

# 2. Its decoder alone, longer (the encoder, and so the latent space, stays as it is). The written VAE has its latent
# channels standardized (zero mean, unit std over the data, folded into its 1x1 convs; scaling_factor 1), so the
# U-Net's noise schedule sees the signal-to-noise ratios it was designed for.
python scripts/train.py --model="$runs/shapes64_vae/model" --component=vae --vae_decoder_only --standardize_latents \
  --data="$data" --output_dir="$runs/shapes64_vae_decoder" --resolution=64 --random_flip --batch_size=8 --max_steps=1200 \
  --learning_rate=2e-4 --warmup_steps=50 --max_grad_norm=1e6 --save_every=200 --log_every=50 --seed=1

# 3. The U-Net and the text encoder on cached latents, with 10% empty captions for classifier-free guidance.
python scripts/train.py --model="$runs/shapes64_vae_decoder/model" --train_text_encoder --data="$data" \
  --output_dir="$runs/shapes64_unet" --resolution=64 --random_flip --cache_latents --caption_dropout=0.1 \
  --batch_size=16 --max_steps=15000 --learning_rate=3e-4 --warmup_steps=200 --lr_schedule=constant \
  --ema_decay=0.999 --snr_gamma=5 --save_every=250 --log_every=50 --seed=0

# 4. Into the package, as float16 (15 MB).
python scripts/convert.py --checkpoint="$runs/shapes64_unet/model" --output=sd_jax/assets/shapes64 --dtype=float16 \
  --overwrite
python scripts/evaluate_shapes.py --seeds=4 --steps=20
