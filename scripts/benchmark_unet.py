"""Times one U-Net evaluation (a sampler step's model call) in sd_jax and in diffusers PyTorch, side by side.

Both run the same random weights at the same sizes in the same process; the numbers and their ratio are printed.

    python scripts/benchmark_unet.py --config=sd15 --latent_size=32 --batch=2 --iters=5
"""

import sys
import time

from absl import app, flags

flags.DEFINE_enum("config", "sd15", ["sd15", "sd21_base", "tiny"], "Model preset (architecture only).")
flags.DEFINE_integer("latent_size", 32, "Latent height and width (image size / 8).")
flags.DEFINE_integer("batch", 2, "U-Net batch (2 = one image with classifier-free guidance).")
flags.DEFINE_integer("iters", 5, "Timed iterations after one warm-up.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "sd_jax compute dtype (PyTorch runs float32).")
flags.DEFINE_bool("torch", True, "Also time diffusers' PyTorch U-Net.")
FLAGS = flags.FLAGS


def _time(fn, iters):
    fn()  # warm-up (and compilation for JAX)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), sum(times) / len(times)


def main(argv):
    del argv
    import diffusers
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from sd_jax.config import preset
    from sd_jax.convert.params import state_from_torch
    from sd_jax.models import abstract_components, resolve_dtype

    config = preset(FLAGS.config)
    torch.manual_seed(0)
    torch_unet = diffusers.UNet2DConditionModel(**config.unet.to_dict()).eval()
    dtype = resolve_dtype(FLAGS.dtype)
    graph, abstract = abstract_components(config, dtype)["unet"]
    state = state_from_torch(abstract, {k: v.numpy() for k, v in torch_unet.state_dict().items()}, dtype=dtype)

    rng = np.random.default_rng(0)
    b, s, c = FLAGS.batch, FLAGS.latent_size, config.unet.in_channels
    x = rng.standard_normal((b, s, s, c)).astype(np.float32)
    t = np.full((b,), 500.0, np.float32)
    context = rng.standard_normal((b, 77, config.unet.cross_attention_dim)).astype(np.float32)

    @jax.jit
    def step(state, x, t, context):
        return nnx.merge(graph, state)(x.astype(dtype), t, context.astype(dtype))

    args = (jnp.asarray(x), jnp.asarray(t), jnp.asarray(context))
    start = time.perf_counter()
    step(state, *args).block_until_ready()
    compile_s = time.perf_counter() - start
    jax_min, jax_mean = _time(lambda: step(state, *args).block_until_ready(), FLAGS.iters)
    params = sum(p.numel() for p in torch_unet.parameters())
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}; torch threads {torch.get_num_threads()}")
    print(f"U-Net {FLAGS.config}: {params / 1e6:.0f}M parameters, latents {b}x{c}x{s}x{s}, context {b}x77")
    print(f"sd_jax ({FLAGS.dtype}): min {jax_min * 1e3:.0f} ms, mean {jax_mean * 1e3:.0f} ms", end=" ")
    print(f"(first call, with compilation: {compile_s:.1f} s)")
    if FLAGS.torch:
        tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        tt, tc = torch.from_numpy(t), torch.from_numpy(context)
        with torch.inference_mode():
            torch_min, torch_mean = _time(lambda: torch_unet(tx, tt, tc).sample, FLAGS.iters)
        print(f"diffusers PyTorch (float32): min {torch_min * 1e3:.0f} ms, mean {torch_mean * 1e3:.0f} ms")
        print(f"ratio PyTorch / sd_jax (min): {torch_min / jax_min:.2f}x")


if __name__ == "__main__":
    sys.exit(app.run(main))
