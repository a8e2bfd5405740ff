"""What sd_jax's CPU convolution paths give: one U-Net call with them, with XLA's convolutions only, and diffusers.

sd_jax runs small wide convolutions and 1x1 convolutions as one matrix product and upsamples by output parity on
CPU (`sd_jax/modules/layers.py`); this compiles the same U-Net twice, with those paths and without, and times both
beside diffusers' PyTorch U-Net on the same random weights, the three taking turns round by round.

    python scripts/benchmark_cpu_convolutions.py --config=sd15 --latent_size=32 --batch=2
"""

import sys
import time

from absl import app, flags

flags.DEFINE_enum("config", "sd15", ["sd15", "sd21_base", "tiny"], "Model preset (architecture only).")
flags.DEFINE_integer("latent_size", 32, "Latent height and width (image size / 8).")
flags.DEFINE_integer("batch", 2, "U-Net batch (2 = one image with classifier-free guidance).")
flags.DEFINE_integer("rounds", 4, "Timed rounds after one warm-up (the fastest counts).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax
    import numpy as np
    import torch
    from flax import nnx

    from sd_jax.benchmark import unet_pair
    from sd_jax.cli import quiet_logs
    from sd_jax.modules import layers

    quiet_logs()
    torch_unet, graph, state, (x_nchw, t, context) = unet_pair(FLAGS.config, FLAGS.batch, FLAGS.latent_size)
    x = x_nchw.transpose(0, 2, 3, 1).copy()
    b, c, s, _ = x_nchw.shape

    def compiled():  # traced now, so it takes the paths `layers` chooses at this moment
        return jax.jit(lambda st, *a: nnx.merge(graph, st)(*a)).lower(state, x, t, context).compile()

    with_paths = compiled()
    saved = layers.MATMUL_MIN_CHANNELS, layers.PARITY_MIN_PIXELS
    layers.MATMUL_MIN_CHANNELS = layers.PARITY_MIN_PIXELS = sys.maxsize
    xla_only = compiled()
    layers.MATMUL_MIN_CHANNELS, layers.PARITY_MIN_PIXELS = saved
    ours, plain = np.asarray(with_paths(state, x, t, context)), np.asarray(xla_only(state, x, t, context))
    difference = np.abs(ours - plain).max() / np.abs(plain).max()
    print(f"largest difference of the two, relative to the output's: {difference:.1e}")

    args_t = (torch.from_numpy(x_nchw), torch.from_numpy(t), torch.from_numpy(context))

    def torch_call():
        with torch.inference_mode():
            torch_unet(*args_t)

    runs = {
        "sd_jax": lambda: with_paths(state, x, t, context).block_until_ready(),
        "sd_jax, XLA's convolutions only": lambda: xla_only(state, x, t, context).block_until_ready(),
        "diffusers PyTorch": torch_call,
    }
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for i in range(FLAGS.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
        print(f"round {i + 1}: " + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in times.items()), flush=True)
    reference = min(times["diffusers PyTorch"])
    print(f"\ndevice: {jax.devices()[0].device_kind}; torch threads {torch.get_num_threads()}; latents {b}x{c}x{s}x{s}")
    print("| U-Net call | min ms | mean ms | / PyTorch (min) |\n|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {min(values) * 1e3:.0f} | {np.mean(values) * 1e3:.0f} | {min(values) / reference:.2f} |")


if __name__ == "__main__":
    sys.exit(app.run(main))
