"""Exports a model to a PyTorch format: a diffusers pipeline folder or an original single .safetensors file.

python scripts/export.py --model=models/sd15 --format=diffusers --output=exported/sd15
python scripts/export.py --model=models/sd21_768_v --format=single_file --output=sd21_768_v.safetensors --dtype=float16
"""

import sys

from absl import app, flags

flags.DEFINE_string("model", None, "Converted folder, diffusers folder, single file or random:NAME; default: shapes64.")
flags.DEFINE_string("format", "diffusers", "diffusers (a StableDiffusionPipeline folder) or single_file.")
flags.DEFINE_string("output", None, "The folder (diffusers) or the .safetensors file (single_file).", required=True)
flags.DEFINE_string("dtype", "float32", "float32, float16 or bfloat16: the dtype of the written weights.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output (once the new one is complete).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax.cli import quiet_logs

    quiet_logs()
    from sd_jax.cli import run_or_exit
    from sd_jax.convert.export import export

    path = run_or_exit(
        export,
        FLAGS.model,
        FLAGS.output,
        format=FLAGS.format,
        dtype=FLAGS.dtype,
        overwrite=FLAGS.overwrite,
        log=lambda message: print(message, file=sys.stderr),
    )
    print(path)


if __name__ == "__main__":
    sys.exit(app.run(main))
