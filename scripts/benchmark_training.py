"""Times one training step of sd_jax and of a diffusers-style PyTorch loop, side by side, on the same weights.

Both sides run float32 in one process from the same random weights and batch; rounds alternate (sd_jax, PyTorch,
sd_jax, ...). With --cached_latents (default) the batch is VAE moments, so a step is the text encoder forward plus
the U-Net forward and backward, clipping and AdamW; without it the VAE encodes pixels first on both sides.

    python scripts/benchmark_training.py --config=shapes64 --batch=8 --steps=5
    python scripts/benchmark_training.py --config=sd15 --resolution=256 --batch=1 --steps=3 --sequential
"""

import dataclasses
import gc
import json
import os
import sys

from absl import app, flags

flags.DEFINE_enum("config", "shapes64", ["shapes64", "sd15", "tiny"], "Model preset (random weights).")
flags.DEFINE_integer("resolution", None, "Image side in pixels (latents are resolution/8); default: the model's.")
flags.DEFINE_integer("batch", 1, "Examples per step.")
flags.DEFINE_integer("steps", 5, "Timed steps per side.")
flags.DEFINE_integer("warmup", 1, "Untimed steps per side after the first (compiling) one.")
flags.DEFINE_bool("train_text_encoder", False, "Train the text encoder too (else U-Net only).")
flags.DEFINE_bool("cached_latents", True, "The batch is cached VAE moments (else pixels through the frozen VAE).")
flags.DEFINE_integer("torch_threads", None, "PyTorch intra-op threads (default: all cores).")
flags.DEFINE_bool("sequential", False, "Time sd_jax, free it, then PyTorch (when both do not fit in memory: sd15).")
flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax.numpy as jnp
    import torch

    from sd_jax.config import preset
    from sd_jax.models import random_components
    from sd_jax.training import benchmark
    from sd_jax.training.options import TrainOptions

    config = preset(FLAGS.config)
    resolution = FLAGS.resolution or 8 * config.unet.sample_size
    options = TrainOptions(
        output_dir="",
        data="",
        config=FLAGS.config,
        train_text_encoder=FLAGS.train_text_encoder,
        resolution=resolution,
        batch_size=FLAGS.batch,
        cache_latents=FLAGS.cached_latents,
    )
    torch.set_num_threads(FLAGS.torch_threads or len(os.sched_getaffinity(0)))
    torch.set_flush_denormal(True)  # XLA:CPU flushes float32 denormals too; without this torch may crawl on them
    torch.manual_seed(0)
    machine = benchmark.machine()  # before the work starts: the load average is other processes'
    states = random_components(config, jnp.float32, seed=0)
    batch = benchmark.random_batch(config, FLAGS.batch, resolution, FLAGS.cached_latents)
    makers = {"sd_jax": benchmark.sd_jax_step, "pytorch": benchmark.torch_step}
    if FLAGS.sequential:
        # Each side builds the same random weights (seed 0) and drops them once it holds its own copy, so that at no
        # time does the process hold a side's training state and a second copy of the weights.
        del states
        gc.collect()
        results = {}
        for name, make in makers.items():
            run = make(config, random_components(config, jnp.float32, seed=0), options, batch)
            gc.collect()
            results |= benchmark.time_alternating({name: run}, steps=FLAGS.steps, warmup=FLAGS.warmup)
            del run
            gc.collect()
    else:
        runs = {name: make(config, states, options, batch) for name, make in makers.items()}
        results = benchmark.time_alternating(runs, steps=FLAGS.steps, warmup=FLAGS.warmup)
    results = {name: benchmark.summarize(r, FLAGS.batch) for name, r in results.items()}
    jax_side, torch_side = results["sd_jax"], results["pytorch"]
    ratio = torch_side["min_s"] / jax_side["min_s"]

    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, load average {machine['load_average_1min']:.2f} "
        f"before the run; JAX {machine['jax_devices']}; torch threads {torch.get_num_threads()}"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()))
    trained = "U-Net + text encoder" if FLAGS.train_text_encoder else "U-Net"
    inputs = "cached latents" if FLAGS.cached_latents else "pixels through the VAE"
    print(
        f"{FLAGS.config}, {resolution}px ({resolution // 8}x{resolution // 8} latents), batch {FLAGS.batch}, "
        f"training {trained} on {inputs}, float32, {FLAGS.steps} timed steps"
    )
    print(f"{'':10}{'min s/step':>12}{'mean s/step':>13}{'steps/s':>10}{'examples/s':>12}{'first step s':>14}")
    for name, r in results.items():
        print(
            f"{name:10}{r['min_s']:12.4f}{r['mean_s']:13.4f}{r['steps_per_s']:10.3f}{r['examples_per_s']:12.3f}"
            f"{r['first_s']:14.2f}"
        )
    print(
        f"ratio PyTorch / sd_jax (min s/step): {ratio:.2f}x  (>1: sd_jax faster); mean: "
        f"{torch_side['mean_s'] / jax_side['mean_s']:.2f}x"
    )
    print(
        "(sd_jax's first step includes compilation; last losses "
        f"sd_jax {jax_side['loss']:.4f}, PyTorch {torch_side['loss']:.4f})"
    )
    if FLAGS.json:
        flag_values = {k: FLAGS[k].value for k in ("config", "batch", "steps", "warmup", "train_text_encoder")}
        record = {
            "flags": {**flag_values, "resolution": resolution, "cached_latents": FLAGS.cached_latents},
            "options": dataclasses.asdict(options),
            "machine": {**machine, "torch_threads": torch.get_num_threads()},
            "results": results,
            "ratio_torch_over_sd_jax_min": ratio,
        }
        with open(FLAGS.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    sys.exit(app.run(main))
