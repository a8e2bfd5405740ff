"""Converts a PyTorch Stable Diffusion checkpoint into an sd_jax folder.

python scripts/convert.py --checkpoint=v1-5-pruned-emaonly.safetensors --output=models/sd15
python scripts/convert.py --checkpoint=path/to/diffusers_folder --output=models/sd21 --dtype=bfloat16
"""

import sys

from absl import app, flags

from sd_jax.convert.readers import MODEL_TYPES

flags.DEFINE_string("checkpoint", None, "A diffusers folder or an original .safetensors / .ckpt file.", required=True)
flags.DEFINE_string("output", None, "The folder to write (must not exist, unless --overwrite).", required=True)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Parameter dtype of the output.")
flags.DEFINE_enum("model_type", "auto", list(MODEL_TYPES), "Single files: the model, when detection is not enough.")
flags.DEFINE_string("bpe_vocab", None, "Single files: CLIP's bpe_simple_vocab_16e6.txt.gz (default: open_clip's).")
flags.DEFINE_bool("overwrite", False, "Replace --output if it exists (the new folder is complete before it does).")
flags.DEFINE_bool("ema", True, "Single files: use the EMA weights when the file has them.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax.cli import quiet_logs

    quiet_logs()
    from sd_jax.cli import run_or_exit
    from sd_jax.convert.convert import convert

    path = run_or_exit(
        convert,
        FLAGS.checkpoint,
        FLAGS.output,
        dtype=FLAGS.dtype,
        model_type=FLAGS.model_type,
        bpe_vocab=FLAGS.bpe_vocab,
        use_ema=FLAGS.ema,
        overwrite=FLAGS.overwrite,
    )
    print(path)


if __name__ == "__main__":
    sys.exit(app.run(main))
