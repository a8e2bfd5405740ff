"""Generation speed and memory: sd_jax, and with --compare=torch diffusers' PyTorch pipeline on the same weights.

    python scripts/benchmark.py --config=sd15 --resolution=256 --steps=20 --compare=torch
    python scripts/benchmark.py --model=PATH --resolution=512 --batch=8 --dtype=bfloat16 --json=out.json

Prints a table (sd_jax, PyTorch, and the time ratio sd_jax / PyTorch: below 1 means sd_jax is faster); `--json`
also writes every number. See `sd_jax.benchmark` for what each row measures.
"""

import json
import sys

from absl import app, flags

from sd_jax.config import PRESETS

flags.DEFINE_string("model", None, "A model path (as --model of txt2img); default: random weights of --config.")
flags.DEFINE_enum("config", "sd15", list(PRESETS), "Preset whose architecture gets random weights.")
flags.DEFINE_integer("resolution", 256, "Image height and width in pixels.")
flags.DEFINE_integer("batch", 1, "Images per call (the U-Net sees twice as many: classifier-free guidance).")
flags.DEFINE_integer("steps", 20, "Sampler steps of the end-to-end runs.")
flags.DEFINE_string("sampler", "euler", "Sampler (one with a diffusers twin for --compare=torch).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "sd_jax parameter and compute dtype.")
flags.DEFINE_enum(
    "torch_dtype", "auto", ["auto", "float32", "bfloat16", "float16"], "PyTorch dtype (auto: fp32 CPU, fp16 CUDA)."
)
flags.DEFINE_integer("rounds", 3, "Timed rounds of each measurement (the best is reported).")
flags.DEFINE_enum("compare", "none", ["none", "torch"], "Also run diffusers' PyTorch pipeline on the same weights.")
flags.DEFINE_string("json", None, "Also write the numbers to this JSON file.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax import benchmark
    from sd_jax.cli import fail, quiet_logs, run_or_exit
    from sd_jax.sampling.samplers import SAMPLERS

    quiet_logs()
    for name in ("resolution", "batch", "steps", "rounds"):
        if getattr(FLAGS, name) < 1:
            fail(f"--{name} must be a positive integer, got {getattr(FLAGS, name)}")
    if FLAGS.resolution % 8:
        fail(f"--resolution must be a multiple of 8, got {FLAGS.resolution}")
    if FLAGS.sampler not in SAMPLERS:
        fail(f"--sampler must be one of {', '.join(SAMPLERS)}, got {FLAGS.sampler!r}")
    if FLAGS.compare == "torch" and FLAGS.sampler not in benchmark.DIFFUSERS_SCHEDULERS:
        fail(f"--sampler={FLAGS.sampler} has no diffusers twin for --compare=torch")
    options = benchmark.Options(
        model=FLAGS.model,
        config=FLAGS.config,
        resolution=FLAGS.resolution,
        batch=FLAGS.batch,
        steps=FLAGS.steps,
        sampler=FLAGS.sampler,
        dtype=FLAGS.dtype,
        rounds=FLAGS.rounds,
        compare_torch=FLAGS.compare == "torch",
        torch_dtype=FLAGS.torch_dtype,
    )
    result = run_or_exit(benchmark.run, options, log=benchmark.main_log)
    print(benchmark.table(result))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    sys.exit(app.run(main))
