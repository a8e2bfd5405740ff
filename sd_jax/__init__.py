"""sd_jax: Stable Diffusion in JAX/Flax.

pipe = sd_jax.load("models/sd15")          # converted folder, diffusers folder or single file
images = pipe.txt2img("a photo of a cat", steps=30, seed=1)
shapes = sd_jax.load().txt2img("a red circle on a blue background", steps=20)   # the default model, 64x64
"""

from sd_jax.loading import LoadError, load
from sd_jax.settings import GenerationSettings

__all__ = ["load", "LoadError", "GenerationSettings"]
__version__ = "0.1.0"
