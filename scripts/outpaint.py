"""Extends an image beyond its borders (multiples of 8 pixels) and paints the new area.

python scripts/outpaint.py --model=models/sd15_inpainting --init_image=photo.png --left=128 --right=128 \
    --prompt="a wide landscape"
"""

import sys

from absl import app, flags

from sd_jax.cli import define_script_flags

define_script_flags("outpaint")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax import cli

    cli.main("outpaint", FLAGS)


if __name__ == "__main__":
    sys.exit(app.run(main))
