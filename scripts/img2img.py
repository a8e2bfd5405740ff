"""Redraws an image under a prompt; --strength says how much of it may change (0 keeps it, 1 ignores it).

python scripts/img2img.py --model=models/sd15 --init_image=photo.png --prompt="an oil painting" --strength=0.6
"""

import sys

from absl import app, flags

from sd_jax.cli import define_common_flags

define_common_flags(size_default="the init image's size, rounded down to multiples of 8")
flags.DEFINE_string("init_image", None, "The image to start from (required).")
flags.DEFINE_float("strength", 0.75, "How much of the schedule runs, in [0, 1].")
flags.DEFINE_bool("tile", None, "Encode and decode with the VAE in tiles (default: above a megapixel).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax.cli import fail, quiet_logs, run_script

    quiet_logs()
    if not FLAGS.init_image:
        fail("--init_image is required")
    call = dict(image=FLAGS.init_image, strength=FLAGS.strength, tile=FLAGS.tile)
    for path in run_script("img2img", FLAGS, call, {"strength": FLAGS.strength}):
        print(path)


if __name__ == "__main__":
    sys.exit(app.run(main))
