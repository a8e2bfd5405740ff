"""Extends an image beyond its borders (multiples of 8 pixels) and paints the new area.

python scripts/outpaint.py --model=models/sd15_inpainting --init_image=photo.png --left=128 --right=128 \
    --prompt="a wide landscape"
"""

import sys

from absl import app, flags

from sd_jax.cli import define_common_flags

define_common_flags(size_default="not taken (the margins set the size)")
flags.DEFINE_string("init_image", None, "The image to extend (required).")
for _side in ("left", "right", "top", "bottom"):
    flags.DEFINE_integer(_side, 0, f"Pixels to add on the {_side}, a multiple of 8.")
flags.DEFINE_integer("seam", 8, "Pixels of the image blended into the new area.")
flags.DEFINE_float("strength", None, "In [0, 1]; default 1 for inpainting models, 0.8 for others.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax.cli import fail, quiet_logs, run_script

    quiet_logs()
    if not FLAGS.init_image:
        fail("--init_image is required")
    if FLAGS["height"].present or FLAGS["width"].present:
        fail("outpaint takes --left/--right/--top/--bottom, not --height/--width")
    margins = {side: FLAGS[side].value for side in ("left", "right", "top", "bottom")}
    call = dict(image=FLAGS.init_image, seam=FLAGS.seam, strength=FLAGS.strength, **margins)
    settings = {"seam": FLAGS.seam, **margins}
    if FLAGS.strength is not None:
        settings["strength"] = FLAGS.strength
    for path in run_script("outpaint", FLAGS, call, settings):
        print(path)


if __name__ == "__main__":
    sys.exit(app.run(main))
