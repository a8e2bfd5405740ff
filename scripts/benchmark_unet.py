"""Where a U-Net call's time goes: the whole call and each of its blocks, sd_jax beside diffusers PyTorch.

Each resnet, transformer, down- and upsampler is timed alone, on the very inputs it receives during a call, with the
same random weights on both sides; the table sums them by kind and by resolution level.

    python scripts/benchmark_unet.py --config=sd15 --latent_size=32 --batch=2
"""

import sys
import time
from collections import defaultdict

from absl import app, flags

flags.DEFINE_enum("config", "sd15", ["sd15", "sd21_base", "tiny"], "Model preset (architecture only).")
flags.DEFINE_integer("latent_size", 32, "Latent height and width (image size / 8).")
flags.DEFINE_integer("batch", 2, "U-Net batch (2 = one image with classifier-free guidance).")
flags.DEFINE_integer("iters", 5, "Timed iterations after one warm-up (the fastest counts).")
FLAGS = flags.FLAGS


def _best(fn, iters):
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv):
    del argv
    import jax
    import torch
    from flax import nnx

    from sd_jax.benchmark import unet_pair
    from sd_jax.cli import quiet_logs

    quiet_logs()
    torch_unet, graph, state, (x, t, context) = unet_pair(FLAGS.config, FLAGS.batch, FLAGS.latent_size)
    unet = nnx.merge(graph, state)
    b, c, s, _ = x.shape

    # Capture every block's inputs during one PyTorch call.
    kinds = {"resnets": "resnet", "attentions": "transformer", "downsamplers": "downsample", "upsamplers": "upsample"}
    captured = {}
    hooks = []
    for name, module in torch_unet.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in kinds:

            def hook(module, args, kwargs, name=name):
                captured[name] = (args, kwargs)

            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.inference_mode():
        torch_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context))
    for h in hooks:
        h.remove()

    def nhwc(a):
        a = a.numpy()
        return jax.numpy.asarray(a.transpose(0, 2, 3, 1) if a.ndim == 4 else a)

    rows = []
    for name, (args, kwargs) in captured.items():
        t_module = torch_unet.get_submodule(name)
        j_module = unet
        for part in name.split("."):
            j_module = j_module[int(part)] if part.isdigit() else getattr(j_module, part)
        kind = kinds[name.split(".")[-2]]
        hidden = args[0]
        if kind == "resnet":
            j_args = (nhwc(hidden), nhwc(args[1] if len(args) > 1 else kwargs["temb"]))
        elif kind == "transformer":
            j_args = (nhwc(hidden), nhwc(kwargs["encoder_hidden_states"]))
        else:
            j_args = (nhwc(hidden),)
        g, st = nnx.split(j_module)
        fn = jax.jit(lambda st, *a, g=g: nnx.merge(g, st)(*a))
        ours = _best(lambda fn=fn, st=st, a=j_args: fn(st, *a).block_until_ready(), FLAGS.iters)
        with torch.inference_mode():
            theirs = _best(lambda m=t_module, a=args, k=kwargs: m(*a, **k), FLAGS.iters)
        level = f"{tuple(hidden.shape[2:])}x{hidden.shape[1]}"
        rows.append((kind, level, name, ours, theirs))
        print(f"{name:<32} {kind:<12} {level:<14} sd_jax {ours * 1e3:8.1f} ms, PyTorch {theirs * 1e3:8.1f} ms")

    whole = jax.jit(lambda st, *a: nnx.merge(graph, st)(*a))
    j_whole = (jax.numpy.asarray(x.transpose(0, 2, 3, 1)), jax.numpy.asarray(t), jax.numpy.asarray(context))
    ours = _best(lambda: whole(state, *j_whole).block_until_ready(), FLAGS.iters)
    with torch.inference_mode():
        theirs = _best(
            lambda: torch_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context)), FLAGS.iters
        )
    print(f"\ndevice: {jax.devices()[0].device_kind}; torch threads {torch.get_num_threads()}; latents {b}x{c}x{s}x{s}")
    print("| part | sd_jax ms | PyTorch ms | sd_jax / PyTorch |\n|---|---|---|---|")
    sums = defaultdict(lambda: [0.0, 0.0])
    for kind, level, _, a, bt in rows:
        for key in (kind, f"{kind} {level}"):
            sums[key][0] += a
            sums[key][1] += bt
    total = [sum(r[3] for r in rows), sum(r[4] for r in rows)]
    for key in sorted(sums):
        a, bt = sums[key]
        print(f"| {key} | {a * 1e3:.0f} | {bt * 1e3:.0f} | {a / bt:.2f} |")
    print(f"| all blocks, timed alone | {total[0] * 1e3:.0f} | {total[1] * 1e3:.0f} | {total[0] / total[1]:.2f} |")
    print(f"| whole U-Net call | {ours * 1e3:.0f} | {theirs * 1e3:.0f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    sys.exit(app.run(main))
