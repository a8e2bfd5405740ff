"""The compiled program of every generation mode: the sampler loop over the guided U-Net, then the VAE decode.

One `jax.jit` runs all of it. The batch is sharded over the mesh and each device loops over fixed-size
micro-batches, so an image's pixels do not depend on how many images share the call or how many devices split it.
txt2img, img2img and both kinds of inpainting are the same program: what differs is data (where the schedule is
entered, the starting latents) and three static switches (`StaticSettings.inpaint`, `.decode`, the sampler).

Everything a call feeds the program is per image (`Batch`): images of different requests (other prompts, seeds,
steps, guidance, strengths) share one call whenever their `StaticSettings` and shapes agree, which is what the batch
job and the server do. The loop reads its `LoopData` once per micro-batch (from the micro-batch's first image), so
images that share a micro-batch must share their loop data; at the default micro-batch of 1 any mix is allowed.

    program = Program(mesh, {"unet": unet_graph, "vae": vae_graph})
    pixels = program.run(states, batch, static, progress=lambda done, total: ...)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import PartitionSpec

from sd_jax import compile_cache, parallel
from sd_jax.sampling import samplers
from sd_jax.sampling.denoisers import vp_denoiser
from sd_jax.sampling.guidance import classifier_free_guidance, interleave

# StaticSettings.inpaint: how the known region of an inpainting call is kept.
CONCAT = "concat"  # a 9-channel inpainting U-Net sees [latents, mask, masked-image latents]
BLEND = "blend"  # any U-Net: after each step the known region is reset to the image's latents at that level

Progress = Callable[[int, int], None]  # (steps done, steps in all) of a call, on the first device


@struct.dataclass
class LoopData:
    """What the loop reads that may change between calls without recompiling: one row per image (leading axis n)."""

    sigmas: jnp.ndarray  # (n, max_steps + 1)
    sigmas_next: jnp.ndarray  # (n, max_steps)
    timesteps: jnp.ndarray  # (n, max_steps) the U-Net timestep of each of the schedule's sigmas
    train_sigmas: jnp.ndarray  # (n, num_train_timesteps)
    num_steps: jnp.ndarray  # (n,) int32
    guidance_scale: jnp.ndarray  # (n,) float32
    guidance_rescale: jnp.ndarray  # (n,) float32
    eta: jnp.ndarray  # (n,) float32
    init_scale: jnp.ndarray  # (n,) float32: multiplies the unit noise into the starting latents
    init_weight: jnp.ndarray  # (n,) float32: multiplies the image latents into them (0 for txt2img and strength 1)
    final_scale: jnp.ndarray  # (n,) float32

    @classmethod
    def rows(cls, n: int, schedule, *, guidance_scale, guidance_rescale, eta, init_weight) -> LoopData:
        """n identical rows: one request's loop data (`schedule` a `sampling.schedules.Schedule`)."""
        row = cls(
            sigmas=np.asarray(schedule.sigmas, np.float32),
            sigmas_next=np.asarray(schedule.sigmas_next, np.float32),
            timesteps=np.asarray(schedule.timesteps, np.float32),
            train_sigmas=np.asarray(schedule.train_sigmas, np.float32),
            num_steps=np.int32(schedule.num_steps),
            guidance_scale=np.float32(guidance_scale),
            guidance_rescale=np.float32(guidance_rescale),
            eta=np.float32(eta),
            init_scale=np.float32(schedule.init_scale),
            init_weight=np.float32(init_weight),
            final_scale=np.float32(schedule.final_scale),
        )
        return jax.tree.map(lambda a: np.broadcast_to(a, (n,) + np.shape(a)), row)


@dataclasses.dataclass(frozen=True)
class StaticSettings:
    """What shapes the compiled program: changing any of it compiles anew."""

    sampler: str
    prediction_type: str
    clip_x0: float | None
    latent_scale: float
    latent_shift: float
    micro_batch: int
    progress: bool = False  # report each step to the host (`Program.run`'s progress callback)
    inpaint: str | None = None  # None, CONCAT or BLEND
    decode: bool = True  # False: return the final latents (the caller decodes them in tiles)


@dataclasses.dataclass(frozen=True)
class Batch:
    """The per-image host arrays of one call (n images, NHWC).

    Attributes:
      inputs: "noise" (n, h, w, C) unit noise; with an input image also "init" (n, h, w, C) its scaled latents;
        for inpainting "mask" (n, h, w, 1) (1 = repaint), and for CONCAT "masked" (n, h, w, C) the latents of the
        image with the repainted area blanked.
      contexts: (n, 2, L, D) each image's [negative, positive] text embeddings.
      context_mask: (n, 2, L) bool, the tokens cross-attention may see (prompts padded to a bucketed length), or
        None when nothing is padded.
      keys: (n, 2) uint32 key data of each image's sampler noise.
      data: the images' `LoopData` rows.
    """

    inputs: dict[str, np.ndarray]
    contexts: np.ndarray
    context_mask: np.ndarray | None
    keys: np.ndarray
    data: LoopData

    @property
    def size(self) -> int:
        return len(self.keys)

    @property
    def shape_key(self) -> tuple:
        """What of the arrays shapes the compiled program (with `StaticSettings`): images sharing it may share a
        call."""
        inputs = tuple(sorted((k, v.shape[1:]) for k, v in self.inputs.items()))
        return inputs, self.contexts.shape[1:], str(self.contexts.dtype), self.context_mask is None

    def select(self, indices: Sequence[int]) -> Batch:
        """The images at `indices`, in that order."""
        index = np.asarray(indices, np.int64)
        take = functools.partial(np.take, indices=index, axis=0)
        mask = None if self.context_mask is None else take(self.context_mask)
        inputs = {k: take(v) for k, v in self.inputs.items()}
        return Batch(inputs, take(self.contexts), mask, take(self.keys), jax.tree.map(take, self.data))


def concatenate(batches: Sequence[Batch]) -> Batch:
    """One batch of the images of several (their `shape_key`s must agree)."""
    keys = {b.shape_key for b in batches}
    if len(keys) != 1:
        raise ValueError(f"batches of different shapes cannot share a call: {sorted(map(str, keys))}")
    join = lambda *arrays: np.concatenate(arrays, axis=0)  # noqa: E731
    first = batches[0]
    return Batch(
        inputs={k: join(*(b.inputs[k] for b in batches)) for k in first.inputs},
        contexts=join(*(b.contexts for b in batches)),
        context_mask=None if first.context_mask is None else join(*(b.context_mask for b in batches)),
        keys=join(*(b.keys for b in batches)),
        data=jax.tree.map(join, *(b.data for b in batches)),
    )


@dataclasses.dataclass(frozen=True)
class ImageKeys:
    """The PRNG keys of n images, each derived from its seed alone (so an image never depends on its batch)."""

    noise: jax.Array  # (n,) typed keys: the starting noise
    sampler: jax.Array  # (n,) the noise the sampler draws while stepping
    fill: jax.Array  # (n,) inpainting's latent-noise fill


def image_keys(seeds: Sequence[int]) -> ImageKeys:
    """Keys of the images with these seeds: the starting noise from key(seed), the sampler's and the fill's from
    that key folded with 1 and 2."""
    return ImageKeys(*_keys_of_seeds(np.asarray(seeds, np.uint32)))  # seeds are < 2**32 (settings.MAX_SEED)


@jax.jit
def _keys_of_seeds(seeds: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    keys = jax.vmap(jax.random.key)(seeds)  # the same keys as jax.random.key(int(seed)) one by one
    fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
    return keys, fold(keys, 1), fold(keys, 2)


@functools.partial(jax.jit, static_argnums=1)
def unit_noise(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Unit normal noise (n, *shape) float32, each image's drawn from its own key (NCHW `shape`, as diffusers')."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def _sample_and_decode(unet, vae, inputs: dict, context, keys, data: LoopData, static: StaticSettings, on_step):
    """One micro-batch of m images -> images (m, H, W, 3) in [0, 1], or VAE latents (m, h, w, C).

    Args:
      inputs: the micro-batch's `Batch.inputs`.
      context: interleaved [uncond, cond] text embeddings (2m, L, D), or with a (2m, L) bool mask of the tokens
        cross-attention may see: a pair (embeddings, mask).
      data: the micro-batch's `LoopData` (one row, no leading axis).
      on_step: `(i) -> None` called after step i, or None.
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
            return unet(jnp.concatenate([x_t, extra], axis=-1).astype(dtype), t, *_unpack(c)).astype(x_t.dtype)
    else:

        def unet_fn(x_t, t, c):
            # The U-Net computes in the model's dtype; guidance and the sampler stay in float32.
            return unet(x_t.astype(dtype), t, *_unpack(c)).astype(x_t.dtype)

    guided = classifier_free_guidance(unet_fn, context, data.guidance_scale, data.guidance_rescale)
    denoise = vp_denoiser(
        guided, data.train_sigmas, static.prediction_type, sigmas=data.sigmas, timesteps=data.timesteps
    )

    blend = None
    if static.inpaint == BLEND:
        mask, init = inputs["mask"], inputs["init"]
        clean = init / data.final_scale  # the image's latents after the last step, before the final rescale

        def blend(i, x):
            # The known region follows the image's own latents, noised with the starting noise to the level the
            # next step starts from; after the last step, the clean latents.
            known = jnp.where(i == data.num_steps - 1, clean, init + noise * data.sigmas[i + 1])
            return mask * x + (1.0 - mask) * known

    after_step = None
    if blend is not None or on_step is not None:

        def after_step(i, x):
            if blend is not None:
                x = blend(i, x)
            if on_step is not None:
                on_step(i)
            return x

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


def generate(mesh, graphs, states, inputs: dict, context, key_data, data: LoopData, call, static: StaticSettings):
    """Per-image inputs (B, h, w, .) -> images (B, H, W, 3) (or latents), B sharded over the mesh.

    Every device runs the same program on micro-batches of a fixed size, so an image's pixels do not depend on
    how many images share the call or how many devices split it: kernels see the same shapes either way.
    `graphs` (static) and `states` hold the "unet" and "vae"; `call` () int32 names the call for progress reports.
    """
    spec = PartitionSpec(parallel.BATCH_AXIS)

    def per_device(states, inputs, context, key_data, data, call):
        unet = nnx.merge(graphs["unet"], states["unet"])
        vae = nnx.merge(graphs["vae"], states["vae"])
        m = static.micro_batch
        chunks = key_data.shape[0] // m
        first_device = jax.lax.axis_index(parallel.BATCH_AXIS) == 0

        def split(a, per_image=1):
            return a.reshape((chunks, per_image * m) + a.shape[1:])

        def chunk(args):
            index, inputs_c, context_c, keys_c, data_c = args
            keys_c = jax.random.wrap_key_data(keys_c)
            on_step = None
            if static.progress:

                def on_step(i):
                    # Once per step of the call, not once per device: the first device speaks for all.
                    jax.lax.cond(first_device, lambda: jax.debug.callback(_report_step, call, index, i), lambda: None)

            return _sample_and_decode(unet, vae, inputs_c, context_c, keys_c, data_c, static, on_step)

        contexts = jax.tree.map(lambda c: split(c, 2), context)
        rows = jax.tree.map(lambda a: split(a)[:, 0], data)  # a micro-batch shares its first image's loop data
        xs = (jnp.arange(chunks), {k: split(v) for k, v in inputs.items()}, contexts, split(key_data), rows)
        out = jax.lax.map(chunk, xs)
        return out.reshape((-1,) + out.shape[2:])

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(PartitionSpec(), spec, spec, spec, spec, PartitionSpec()),
        out_specs=spec,
        # The body has no collectives; without this, samplers' zero-initialised loop buffers (device-invariant)
        # would need casting to the device-varying type of the values stored into them.
        check_vma=False,
    )(states, inputs, context, key_data, data, call)


# ---------------------------------------------------------------------------------------------------------------
# Progress: the running program calls back with (call, micro-batch, step); each call registers its reporter.

_reporters: dict[int, tuple[Progress, np.ndarray, int]] = {}
_reporters_lock = threading.Lock()
_call_ids = itertools.count()


def _report_step(call, index, step) -> None:
    with _reporters_lock:
        entry = _reporters.get(int(call))
    if entry is not None:
        report, offsets, total = entry
        report(int(offsets[int(index)]) + int(step) + 1, total)


class Program:
    """The compiled generation program of one model on one mesh; `run` is safe to call from several threads."""

    def __init__(self, mesh, graphs: dict):
        self.mesh = mesh
        # One executable per program for every model of this architecture on this mesh (the weights are arguments).
        self._jit = compile_cache.shared_jit(generate, mesh, graphs, static_argnames=("static",))

    def compiled_count(self) -> int:
        """How many executables have been compiled (one per distinct `StaticSettings` and `Batch.shape_key`)."""
        return self._jit._cache_size()

    def run(
        self,
        states: dict,
        batch: Batch,
        static: StaticSettings,
        progress: Progress | None = None,
        *,
        pad_to: int = 0,
    ):
        """The batch's images (n, H, W, 3) float32 in [0, 1], or with `static.decode` False their latents.

        progress: optional `(done, total)` callback, once per sampler step of the first device's images (all
        devices step in lockstep): done counts the steps its micro-batches have taken, total their steps in all.
        pad_to: pad the batch to at least this many images (a batch job's fixed call size: its last call of a group
          then reuses the group's executable).
        """
        n, m = batch.size, static.micro_batch
        padded = parallel.padded_batch_size(max(n, pad_to), self.mesh.size * m)
        shard = parallel.batch_sharding(self.mesh)

        def put(per_image: np.ndarray, interleaved: bool = False) -> jax.Array:
            per_image = parallel.pad_batch(np.asarray(per_image), padded)
            if interleaved:  # (n, 2, ...) -> [u0, c0, u1, c1, ...]: both halves of an image on its device
                per_image = per_image.reshape((2 * padded,) + per_image.shape[2:])
            return jax.device_put(per_image, shard)

        context = put(batch.contexts, interleaved=True)
        if batch.context_mask is not None:
            context = (context, put(batch.context_mask, interleaved=True))
        data = jax.tree.map(put, batch.data)
        call = next(_call_ids)
        if progress is not None:
            # The first device's micro-batches, and the steps before each: what the running loop's reports count.
            steps = parallel.pad_batch(np.asarray(batch.data.num_steps), padded)[: padded // self.mesh.size : m]
            offsets = np.concatenate([[0], np.cumsum(steps)])
            with _reporters_lock:
                _reporters[call] = (progress, offsets, int(offsets[-1]))
        try:
            out = self._jit(
                states,
                {k: put(v) for k, v in batch.inputs.items()},
                context,
                put(batch.keys),
                data,
                np.int32(call),
                static=dataclasses.replace(static, progress=progress is not None),
            )
            return np.asarray(jax.device_get(out))[:n]
        finally:
            with _reporters_lock:
                _reporters.pop(call, None)
