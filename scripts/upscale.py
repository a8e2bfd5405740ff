"""Upscales an image ("hires fix"): a Lanczos resize by --scale, then img2img at --strength, tiled VAE when large.

python scripts/upscale.py --model=models/sd15 --init_image=small.png --scale=2 --strength=0.35 --prompt="a castle"
"""

import sys

from absl import app, flags

from sd_jax.cli import define_script_flags

define_script_flags("upscale")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax import cli

    cli.main("upscale", FLAGS)


if __name__ == "__main__":
    sys.exit(app.run(main))
