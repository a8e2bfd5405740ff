"""Upscales an image ("hires fix"): a Lanczos resize by --scale, then img2img at --strength, tiled VAE when large.

python scripts/upscale.py --model=models/sd15 --init_image=small.png --scale=2 --strength=0.35 --prompt="a castle"
"""

import sys

from absl import app, flags

from sd_jax.cli import define_common_flags

define_common_flags(size_default="not taken (--scale sets the size)")
flags.DEFINE_string("init_image", None, "The image to upscale (required).")
flags.DEFINE_float("scale", 2.0, "Size factor (the result is rounded to multiples of 8).")
flags.DEFINE_float("strength", 0.35, "How much img2img may change the resized image, in [0, 1].")
flags.DEFINE_bool("tile", None, "Encode and decode with the VAE in tiles (default: above a megapixel).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax.cli import fail, quiet_logs, run_script

    quiet_logs()
    if not FLAGS.init_image:
        fail("--init_image is required")
    if FLAGS["height"].present or FLAGS["width"].present:
        fail("upscale takes --scale, not --height/--width")
    call = dict(image=FLAGS.init_image, scale=FLAGS.scale, strength=FLAGS.strength, tile=FLAGS.tile)
    for path in run_script("upscale", FLAGS, call, {"strength": FLAGS.strength, "upscale": FLAGS.scale}):
        print(path)


if __name__ == "__main__":
    sys.exit(app.run(main))
