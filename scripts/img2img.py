"""Redraws an image under a prompt; --strength says how much of it may change (0 keeps it, 1 ignores it).

python scripts/img2img.py --model=models/sd15 --init_image=photo.png --prompt="an oil painting" --strength=0.6
"""

import sys

from absl import app, flags

from sd_jax.cli import define_script_flags

define_script_flags("img2img", size_default="the init image's size, rounded down to multiples of 8")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax import cli

    cli.main("img2img", FLAGS)


if __name__ == "__main__":
    sys.exit(app.run(main))
