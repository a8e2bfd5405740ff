"""Writes the synthetic "shapes" training data: NNNNNN.png images with their captions in NNNNNN.txt.

python scripts/make_shapes.py --output_dir=data/shapes --per_caption=100

The 84 training captions by default (the 6 held-out combinations are left for testing composition); rerunning
resumes: finished pairs are skipped.
"""

import sys

from absl import app, flags

flags.DEFINE_string("output_dir", None, "Folder for the image and caption files (required).")
flags.DEFINE_integer("per_caption", 100, "Images per caption.")
flags.DEFINE_integer("size", 64, "Image side in pixels.")
flags.DEFINE_integer("seed", 0, "Image i is drawn from the generator seeded by (seed, i).")
flags.DEFINE_bool("include_held_out", False, "Also draw the 6 held-out captions (all 90).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax import shapes
    from sd_jax.cli import fail, run_or_exit

    if not FLAGS.output_dir:
        fail("--output_dir is required")
    if FLAGS.size < 32:
        fail(f"--size must be at least 32 (the evaluator's smallest image), got {FLAGS.size}")
    captions = shapes.ALL_CAPTIONS if FLAGS.include_held_out else shapes.TRAIN_CAPTIONS
    written = run_or_exit(shapes.write_dataset, FLAGS.output_dir, captions, FLAGS.per_caption, FLAGS.size, FLAGS.seed)
    total = len(captions) * FLAGS.per_caption
    print(f"{FLAGS.output_dir}: wrote {written} of {total} image-caption pairs ({total - written} already there)")


if __name__ == "__main__":
    sys.exit(app.run(main))
