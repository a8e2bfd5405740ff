"""Generates every image of a prompts file in full device batches, resumably: rerun the same command after a kill.

python scripts/generate_batch.py --prompts_file=prompts.jsonl --output_dir=outputs/job --steps=20
python scripts/generate_batch.py --prompts_file=prompts.txt --output_dir=outputs/job \
    --coordinator_address=host0:1234 --num_processes=2 --process_id=0   # one command per host

A text file has one prompt a line; a .jsonl file one settings object a line (`sd_jax.batch_files`). The images are
named <line>-<index>.png; manifest.jsonl records each one (line, index, seed, settings, file, status, seconds).
"""

import sys

from absl import app, flags

from sd_jax.cli import define_batch_flags

define_batch_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax import cli

    cli.batch_main(FLAGS)


if __name__ == "__main__":
    sys.exit(app.run(main))
