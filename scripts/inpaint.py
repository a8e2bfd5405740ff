"""Repaints the white area of a mask; every pixel outside the (blurred) mask is kept exactly.

python scripts/inpaint.py --model=models/sd15_inpainting --init_image=room.png --mask=mask.png --prompt="a red sofa"
"""

import sys

from absl import app, flags

from sd_jax.cli import define_script_flags

define_script_flags("inpaint", size_default="the image's size (with --only_masked: the model's native size)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax import cli

    cli.main("inpaint", FLAGS)


if __name__ == "__main__":
    sys.exit(app.run(main))
