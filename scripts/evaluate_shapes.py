"""Scores a model trained on the shapes data with the deterministic evaluator: the 84 training captions and the
6 held-out ones, each with seeds 0..N-1, read back for shape colour, shape class and background.

python scripts/evaluate_shapes.py                       # the default model
python scripts/evaluate_shapes.py --model=runs/shapes64_unet/model --seeds=4 --steps=20
"""

import json
import sys

from absl import app, flags

flags.DEFINE_string("model", None, "Model to score (default: the shipped default model).")
flags.DEFINE_integer("seeds", 4, "Seeds 0..N-1 per caption.")
flags.DEFINE_integer("steps", 20, "Sampling steps.")
flags.DEFINE_string("sampler", "ddim", "Sampler.")
flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax.cli import fail, quiet_logs, run_or_exit

    quiet_logs()
    import sd_jax
    from sd_jax import shapes

    if FLAGS.seeds < 1 or FLAGS.steps < 1:
        fail("--seeds and --steps must be at least 1")
    pipe = run_or_exit(sd_jax.load, FLAGS.model)
    settings = {"steps": FLAGS.steps, "sampler": FLAGS.sampler, "guidance_scale": FLAGS.guidance_scale}
    for name, captions in (("train", shapes.TRAIN_CAPTIONS), ("held_out", shapes.HELD_OUT)):
        result = shapes.score_model(pipe, captions, range(FLAGS.seeds), **settings)
        print(json.dumps({"captions": name, **settings, "seeds": FLAGS.seeds, **result}))


if __name__ == "__main__":
    sys.exit(app.run(main))
