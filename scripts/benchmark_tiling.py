"""Measures tiled against untiled VAE decode and encode (error and time), and a large tiled decode's time and memory.

The large decode runs first, so the peak resident memory printed after it is that decode's (and compilation's).
Inputs are a smooth synthetic image and its untiled encoding; errors are in [0, 1] pixel units for decode and raw
latent units for encode. Times are of a second call (compiled); the first includes compilation.

    python scripts/benchmark_tiling.py --size=1024 --tile=64 --overlap=16 --big_size=2048
"""

import resource
import sys
import time

from absl import app, flags

flags.DEFINE_integer("size", 1024, "Image side in pixels for the tiled-vs-untiled comparison.")
flags.DEFINE_integer("tile", 64, "Tile side in latent pixels (encode uses tile * factor image pixels).")
flags.DEFINE_integer("overlap", 16, "Minimum overlap between tiles in latent pixels.")
flags.DEFINE_integer("big_size", 2048, "Image side of the tiled-only decode (0 to skip).")
flags.DEFINE_string("model", "random:tiny", "Model for sd_jax.load (default: the tiny random-weight model).")
FLAGS = flags.FLAGS


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _timed(fn):
    """(result, seconds of the first call, seconds of a second call)."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, times[0], times[1]


def main(argv):
    del argv
    import functools

    import jax
    import numpy as np
    from flax import nnx

    from sd_jax.loading import load_components
    from sd_jax.models import abstract_components
    from sd_jax.tiling import tiled_decode, tiled_encode

    config, states, _ = load_components(FLAGS.model)
    graph, state = abstract_components(config)["vae"][0], states["vae"]
    decode_fn = jax.jit(lambda state, z: nnx.merge(graph, state).decode(z))
    encode_fn = jax.jit(lambda state, x: nnx.merge(graph, state).encode(x)[0])
    decode, encode = functools.partial(decode_fn, state), functools.partial(encode_fn, state)
    f, tile, overlap = 2 ** (len(config.vae.block_out_channels) - 1), FLAGS.tile, FLAGS.overlap
    decode_tiled = functools.partial(tiled_decode, decode, tile=tile, overlap=overlap, factor=f)
    encode_tiled = functools.partial(tiled_encode, encode, tile=tile * f, overlap=overlap * f, factor=f)
    print(f"device: {jax.devices()[0].device_kind}; VAE factor {f}; tile {tile}, overlap {overlap} latent pixels")

    if FLAGS.big_size:
        s = FLAGS.big_size // f
        z = np.random.default_rng(0).standard_normal((1, s, s, config.vae.latent_channels)).astype(np.float32)
        out, first, second = _timed(lambda: decode_tiled(z))
        print(f"tiled decode {out.shape[1]}x{out.shape[2]}: {second:.2f} s (first call {first:.2f} s)", end=" ")
        print(f"peak RSS {_peak_rss_mib():.0f} MiB")

    yy, xx = np.mgrid[0 : FLAGS.size, 0 : FLAGS.size].astype(np.float32) / 64.0
    waves = np.random.default_rng(2).uniform(-3, 3, (3, 3, 3)).astype(np.float32)
    image = np.stack([sum(np.sin(a * yy + b * xx + p) for a, b, p in w) / 3 for w in waves], axis=-1)[None]

    full_z, _, full_s = _timed(lambda: np.asarray(encode(image)))
    tiled_z, _, tiled_s = _timed(lambda: encode_tiled(image))
    err = np.abs(tiled_z - full_z)
    print(f"encode {FLAGS.size}px: untiled {full_s:.2f} s, tiled {tiled_s:.2f} s;", end=" ")
    print(f"error max {err.max():.4f} mean {err.mean():.4f} (latent std {full_z.std():.3f})")

    full_x, _, full_s = _timed(lambda: np.asarray(decode(full_z)))
    tiled_x, _, tiled_s = _timed(lambda: decode_tiled(full_z))
    err = np.abs(tiled_x - full_x) / 2
    shown = np.abs(np.clip(tiled_x / 2 + 0.5, 0, 1) - np.clip(full_x / 2 + 0.5, 0, 1))
    print(f"decode {FLAGS.size}px: untiled {full_s:.2f} s, tiled {tiled_s:.2f} s; error in [0,1] units", end=" ")
    print(f"max {err.max():.4f} mean {err.mean():.4f}, clipped max {shown.max():.4f} mean {shown.mean():.4f}", end=" ")
    print(f"(image std {full_x.std() / 2:.3f})")
    print(f"peak RSS at the end {_peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    sys.exit(app.run(main))
