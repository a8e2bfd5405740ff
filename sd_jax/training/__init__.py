"""Training: fine-tuning and from-scratch training of the U-Net (optionally the text encoder) or the VAE.

from sd_jax.training import TrainOptions, train
train(TrainOptions(output_dir="runs/x", data="photos/", model="models/sd15", resolution=512, max_steps=1000))
"""

from sd_jax.training.data import DataError
from sd_jax.training.options import TrainOptions
from sd_jax.training.trainer import Trainer, train

__all__ = ["TrainOptions", "Trainer", "train", "DataError"]
