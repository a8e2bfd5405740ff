"""Repaints the white area of a mask; every pixel outside the (blurred) mask is kept exactly.

python scripts/inpaint.py --model=models/sd15_inpainting --init_image=room.png --mask=mask.png --prompt="a red sofa"
"""

import sys

from absl import app, flags

from sd_jax.cli import define_common_flags

define_common_flags(size_default="the image's size (with --only_masked: the model's native size)")
flags.DEFINE_string("init_image", None, "The image to repaint (required).")
flags.DEFINE_string("mask", None, "Mask image of the same size: white is repainted (required).")
flags.DEFINE_float("strength", 1.0, "In [0, 1]; 1 starts the masked area from pure noise.")
flags.DEFINE_float("mask_blur", 4.0, "Gaussian blur radius of the mask in pixels (the paste-back seam).")
flags.DEFINE_bool("only_masked", False, "Work on the mask's box plus --padding at --width x --height, paste back.")
flags.DEFINE_integer("padding", 32, "Pixels around the mask's box with --only_masked.")
flags.DEFINE_enum("fill", "original", ["original", "noise", "latent_noise", "latent_nothing"], "Start of the area.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax.cli import fail, quiet_logs, run_script

    quiet_logs()
    if not FLAGS.init_image or not FLAGS.mask:
        fail("--init_image and --mask are required")
    settings = dict(
        strength=FLAGS.strength,
        mask_blur=FLAGS.mask_blur,
        only_masked=FLAGS.only_masked,
        padding=FLAGS.padding,
        fill=FLAGS.fill,
    )
    call = dict(image=FLAGS.init_image, mask=FLAGS.mask, **settings)
    for path in run_script("inpaint", FLAGS, call, settings):
        print(path)


if __name__ == "__main__":
    sys.exit(app.run(main))
