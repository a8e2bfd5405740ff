"""Times each sampler's loop (U-Net with classifier-free guidance) in sd_jax and, where one exists, its diffusers
twin in PyTorch, on the same random U-Net in the same process; prints time per step and calls per step.

    python scripts/benchmark_samplers.py --config=sd15 --latent_size=32 --steps=3
"""

import sys
import time

from absl import app, flags

flags.DEFINE_enum("config", "sd15", ["sd15", "sd21_base", "tiny"], "Model preset (architecture only).")
flags.DEFINE_integer("latent_size", 32, "Latent height and width (image size / 8).")
flags.DEFINE_integer("steps", 3, "Steps per timed run.")
flags.DEFINE_list("samplers", [], "Samplers to time (default: all).")
flags.DEFINE_bool("torch", True, "Also time the diffusers twins in PyTorch.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import diffusers
    import jax
    import numpy as np
    import torch
    from flax import nnx

    from sd_jax.benchmark import DIFFUSERS_SCHEDULERS as TWINS
    from sd_jax.config import preset
    from sd_jax.convert.params import state_from_torch
    from sd_jax.models import abstract_components
    from sd_jax.sampling import samplers
    from sd_jax.sampling.denoisers import vp_denoiser
    from sd_jax.sampling.guidance import classifier_free_guidance

    config = preset(FLAGS.config)
    torch.manual_seed(0)
    torch_unet = diffusers.UNet2DConditionModel(**config.unet.to_dict()).eval()
    graph, abstract = abstract_components(config)["unet"]
    state = state_from_torch(abstract, {k: v.numpy() for k, v in torch_unet.state_dict().items()})
    s, c, d = FLAGS.latent_size, config.unet.in_channels, config.unet.cross_attention_dim
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, s, s, c)).astype(np.float32)
    context = rng.standard_normal((2, 77, d)).astype(np.float32)
    keys = jax.random.key_data(jax.random.split(jax.random.key(0), 1))
    names = FLAGS.samplers or list(samplers.SAMPLERS)
    print(f"device: {jax.devices()[0].device_kind}; torch threads {torch.get_num_threads()}")
    print(
        f"U-Net {FLAGS.config}, latents 1x{c}x{s}x{s} with classifier-free guidance (U-Net batch 2), "
        f"{FLAGS.steps} steps, float32"
    )
    print(f"{'sampler':<14}{'calls/step':>11}{'sd_jax s/step':>15}{'PyTorch s/step':>16}{'ratio':>8}")

    def loop(state, noise, context, key_data, data, *, name):
        unet = nnx.merge(graph, state)
        guided = classifier_free_guidance(lambda x, t, ctx: unet(x, t, ctx), context, data["guidance_scale"])
        denoise = vp_denoiser(
            guided, data["train_sigmas"], config.prediction_type, sigmas=data["sigmas"], timesteps=data["timesteps"]
        )
        return samplers.run(
            name,
            denoise,
            noise * data["init_scale"],
            sigmas=data["sigmas"],
            sigmas_next=data["sigmas_next"],
            num_steps=data["num_steps"],
            keys=jax.random.wrap_key_data(key_data),
            eta=0.0,
        )

    for name in names:
        sched = samplers.schedule(name, "default", config.scheduler, FLAGS.steps)
        data = {
            "sigmas": sched.sigmas,
            "sigmas_next": sched.sigmas_next,
            "timesteps": sched.timesteps,
            "train_sigmas": sched.train_sigmas,
            "num_steps": np.int32(FLAGS.steps),
            "guidance_scale": np.float32(7.5),
            "init_scale": np.float32(sched.init_scale),
        }
        args = (state, noise, context, keys, data)
        # Compile ahead of time, so that only one run of the loop is paid for.
        run = jax.jit(lambda *a, name=name: loop(*a, name=name)).lower(*args).compile()
        start = time.perf_counter()
        run(*args).block_until_ready()
        ours = (time.perf_counter() - start) / FLAGS.steps
        theirs = float("nan")
        if FLAGS.torch and name in TWINS:
            cls, extra = TWINS[name]
            twin = getattr(diffusers, cls).from_config(dict(config.scheduler), **extra)
            twin.set_timesteps(FLAGS.steps)
            ctx = torch.from_numpy(context)
            with torch.inference_mode():
                latents = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()) * twin.init_noise_sigma
                start = time.perf_counter()
                for t in twin.timesteps:
                    inp = twin.scale_model_input(torch.cat([latents] * 2), t)
                    out = torch_unet(inp, t, ctx).sample
                    uncond, cond = out.chunk(2)
                    latents = twin.step(uncond + 7.5 * (cond - uncond), t, latents).prev_sample
                theirs = (time.perf_counter() - start) / FLAGS.steps
        calls = samplers.SAMPLERS[name].calls_per_step
        print(f"{name:<14}{calls:>11}{ours:>15.2f}{theirs:>16.2f}{theirs / ours:>8.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(app.run(main))
