"""Generates images from text and writes them as PNGs (with AUTOMATIC1111 metadata and the invisible watermark).

python scripts/txt2img.py --prompt="a red circle on a blue background" --steps=20   # the default model, 64x64
python scripts/txt2img.py --model=models/sd15 --prompt="a photo of a (cat:1.2)" --steps=30 --num_images=4
python scripts/txt2img.py --from_png=outputs/00000-0.png    # the same image again, from the PNG's settings
python scripts/txt2img.py --model=random:tiny --prompt="a cat" --steps=2   # a tiny random-weight model (noise)
"""

import sys

from absl import app, flags

from sd_jax.cli import define_script_flags

define_script_flags("txt2img", size_default="the model's native size (64 for the default model, 512 for SD 1.x)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax import cli

    cli.main("txt2img", FLAGS)


if __name__ == "__main__":
    sys.exit(app.run(main))
