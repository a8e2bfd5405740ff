"""The compiled program of every generation mode: the sampler loop over the guided U-Net, then the VAE decode.

One `jax.jit` runs all of it. The batch is sharded over the mesh and each device loops over fixed-size
micro-batches, so an image's pixels do not depend on how many images share the call or how many devices split it.
txt2img, img2img and both kinds of inpainting are the same program: what differs is data (where the schedule is
entered, the starting latents) and three static switches (`StaticSettings.inpaint`, `.decode`, the sampler).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec

from sd_jax import parallel
from sd_jax.sampling import samplers
from sd_jax.sampling.denoisers import vp_denoiser
from sd_jax.sampling.guidance import classifier_free_guidance, interleave

# StaticSettings.inpaint: how the known region of an inpainting call is kept.
CONCAT = "concat"  # a 9-channel inpainting U-Net sees [latents, mask, masked-image latents]
BLEND = "blend"  # any U-Net: after each step the known region is reset to the image's latents at that level


@struct.dataclass
class LoopData:
    """Everything the loop reads that may change between calls without recompiling (all replicated)."""

    sigmas: jnp.ndarray  # (max_steps + 1,)
    sigmas_next: jnp.ndarray  # (max_steps,)
    timesteps: jnp.ndarray  # (max_steps,) the U-Net timestep of each of the schedule's sigmas
    train_sigmas: jnp.ndarray  # (num_train_timesteps,)
    num_steps: jnp.ndarray  # () int32
    guidance_scale: jnp.ndarray  # () float32
    guidance_rescale: jnp.ndarray  # () float32
    eta: jnp.ndarray  # () float32
    init_scale: jnp.ndarray  # () float32: multiplies the unit noise into the starting latents
    init_weight: jnp.ndarray  # () float32: multiplies the image latents into them (0 for txt2img and strength 1)
    final_scale: jnp.ndarray  # () float32


@dataclasses.dataclass(frozen=True)
class StaticSettings:
    """What shapes the compiled program: changing any of it compiles anew."""

    sampler: str
    prediction_type: str
    clip_x0: float | None
    latent_scale: float
    latent_shift: float
    micro_batch: int
    progress: Callable | None
    inpaint: str | None = None  # None, CONCAT or BLEND
    decode: bool = True  # False: return the final latents (the caller decodes them in tiles)


def _sample_and_decode(unet, vae, inputs: dict, context, keys, data: LoopData, static: StaticSettings):
    """One micro-batch of m images -> images (m, H, W, 3) in [0, 1], or VAE latents (m, h, w, C).

    Args:
      inputs: "noise" (m, h, w, C) unit noise; with an input image also "init" (m, h, w, C) its scaled latents;
        for inpainting "mask" (m, h, w, 1) (1 = repaint), and for CONCAT "masked" (m, h, w, C) the latents of
        the image with the repainted area blanked.
      context: interleaved [uncond, cond] text embeddings (2m, L, D), or with a (2m, L) bool mask of the tokens
        cross-attention may see (prompts padded to a bucketed length): a pair (embeddings, mask).
    """
    dtype = (context[0] if isinstance(context, tuple) else context).dtype
    noise = inputs["noise"]
    x = noise * data.init_scale
    if "init" in inputs:
        x = x + inputs["init"] * data.init_weight

    if static.inpaint == CONCAT:
        extra = jnp.concatenate([inputs["mask"], inputs["masked"]], axis=-1)
        extra = interleave(extra, extra)  # both halves of classifier-free guidance see the same conditioning

        def unet_fn(x_t, t, c):
            return unet(jnp.concatenate([x_t, extra], axis=-1).astype(dtype), t, *_unpack(c))
    else:

        def unet_fn(x_t, t, c):
            return unet(x_t.astype(dtype), t, *_unpack(c))

    guided = classifier_free_guidance(unet_fn, context, data.guidance_scale, data.guidance_rescale)
    denoise = vp_denoiser(
        guided, data.train_sigmas, static.prediction_type, sigmas=data.sigmas, timesteps=data.timesteps
    )
    if static.progress is not None:
        inner = denoise

        def denoise(x, sigma):
            jax.debug.callback(static.progress, sigma)
            return inner(x, sigma)

    after_step = None
    if static.inpaint == BLEND:
        mask, init = inputs["mask"], inputs["init"]
        clean = init / data.final_scale  # the image's latents after the last step, before the final rescale

        def after_step(i, x):
            # The known region follows the image's own latents, noised with the starting noise to the level the
            # next step starts from; after the last step, the clean latents.
            known = jnp.where(i == data.num_steps - 1, clean, init + noise * data.sigmas[i + 1])
            return mask * x + (1.0 - mask) * known

    latents = samplers.run(
        static.sampler,
        denoise,
        x,
        sigmas=data.sigmas,
        sigmas_next=data.sigmas_next,
        num_steps=data.num_steps,
        keys=keys,
        eta=data.eta,
        clip_x0=static.clip_x0,
        prediction_type=static.prediction_type,
        after_step=after_step,
    )
    latents = latents * data.final_scale / static.latent_scale + static.latent_shift
    if not static.decode:
        return latents
    images = vae.decode(latents.astype(dtype))
    return jnp.clip(images.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)


def _unpack(context) -> tuple:
    """U-Net arguments (encoder_hidden_states[, encoder_attention_mask]) of a context or (context, mask)."""
    return context if isinstance(context, tuple) else (context,)


def generate(mesh, graphs, states, inputs: dict, context, key_data, data: LoopData, static: StaticSettings):
    """Per-image inputs (B, h, w, .) -> images (B, H, W, 3) (or latents), B sharded over the mesh.

    Every device runs the same program on micro-batches of a fixed size, so an image's pixels do not depend on
    how many images share the call or how many devices split it: kernels see the same shapes either way.
    `graphs` (static) and `states` hold the "unet" and "vae".
    """
    spec = PartitionSpec(parallel.BATCH_AXIS)

    def per_device(states, inputs, context, key_data, data):
        unet = nnx.merge(graphs["unet"], states["unet"])
        vae = nnx.merge(graphs["vae"], states["vae"])
        m = static.micro_batch
        chunks = key_data.shape[0] // m

        def split(a, per_image=1):
            return a.reshape((chunks, per_image * m) + a.shape[1:])

        def chunk(args):
            inputs_c, context_c, keys_c = args
            keys_c = jax.random.wrap_key_data(keys_c)
            return _sample_and_decode(unet, vae, inputs_c, context_c, keys_c, data, static)

        contexts = jax.tree.map(lambda c: split(c, 2), context)
        out = jax.lax.map(chunk, ({k: split(v) for k, v in inputs.items()}, contexts, split(key_data)))
        return out.reshape((-1,) + out.shape[2:])

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(PartitionSpec(), spec, spec, spec, PartitionSpec()),
        out_specs=spec,
        # The body has no collectives; without this, samplers' zero-initialised loop buffers (device-invariant)
        # would need casting to the device-varying type of the values stored into them.
        check_vma=False,
    )(states, inputs, context, key_data, data)
