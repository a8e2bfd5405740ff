"""Text-to-image generation: wiring the tokenizer, text encoder, sampler loop and VAE together.

text -> tokens -> embeddings -> (sampler loop over the U-Net, one jit) -> latents -> VAE -> pixels.
The batch is sharded over every device of the mesh; weights are replicated. Image i of a call is a pure function
of its prompt, the settings and seed + i, whatever the batch size or device count.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import PartitionSpec
from PIL import Image

from sd_jax import parallel
from sd_jax.config import ModelConfig
from sd_jax.models import abstract_components
from sd_jax.sampling import samplers
from sd_jax.sampling.denoisers import vp_denoiser
from sd_jax.sampling.guidance import classifier_free_guidance, interleave
from sd_jax.sampling.schedules import scheduler_settings
from sd_jax.tokenizer import tokenize

MAX_SEED = 2**32 - 1  # PRNG seeds are 32-bit (as AUTOMATIC1111's); larger ones would alias


def _text_embeddings(graphdef, state, input_ids, *, clip_skip: int):
    return nnx.merge(graphdef, state)(input_ids, clip_skip=clip_skip)


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
    init_scale: jnp.ndarray  # () float32
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


def _sample_and_decode(unet, vae, noise, context, keys, data: LoopData, static: StaticSettings):
    """One micro-batch: noise (m, h, w, C) and interleaved context (2m, L, D) -> images (m, H, W, 3) in [0, 1]."""
    dtype = context.dtype

    def unet_fn(x_t, t, c):
        return unet(x_t.astype(dtype), t, c)

    guided = classifier_free_guidance(unet_fn, context, data.guidance_scale, data.guidance_rescale)
    denoise = vp_denoiser(
        guided, data.train_sigmas, static.prediction_type, sigmas=data.sigmas, timesteps=data.timesteps
    )
    if static.progress is not None:
        inner = denoise

        def denoise(x, sigma):
            jax.debug.callback(static.progress, sigma)
            return inner(x, sigma)

    latents = samplers.run(
        static.sampler,
        denoise,
        noise * data.init_scale,
        sigmas=data.sigmas,
        sigmas_next=data.sigmas_next,
        num_steps=data.num_steps,
        keys=keys,
        eta=data.eta,
        clip_x0=static.clip_x0,
        prediction_type=static.prediction_type,
    )
    latents = latents * data.final_scale
    images = vae.decode((latents / static.latent_scale + static.latent_shift).astype(dtype))
    return jnp.clip(images.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)


def _generate(mesh, graphs, states, noise, context, key_data, data: LoopData, static: StaticSettings):
    """Noise (B, h, w, C) -> images (B, H, W, 3), B sharded over the mesh, each device looping over micro-batches.

    Every device runs the same program on micro-batches of a fixed size, so an image's pixels do not depend on
    how many images share the call or how many devices split it: kernels see the same shapes either way.
    """
    spec = PartitionSpec(parallel.BATCH_AXIS)

    def per_device(states, noise, context, key_data, data):
        unet = nnx.merge(graphs["unet"], states["unet"])
        vae = nnx.merge(graphs["vae"], states["vae"])
        m = static.micro_batch
        chunks = noise.shape[0] // m

        def chunk(args):
            noise_c, context_c, keys_c = args
            keys_c = jax.random.wrap_key_data(keys_c)
            return _sample_and_decode(unet, vae, noise_c, context_c, keys_c, data, static)

        images = jax.lax.map(
            chunk,
            (
                noise.reshape((chunks, m) + noise.shape[1:]),
                context.reshape((chunks, 2 * m) + context.shape[1:]),
                key_data.reshape((chunks, m) + key_data.shape[1:]),
            ),
        )
        return images.reshape((-1,) + images.shape[2:])

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(PartitionSpec(), spec, spec, spec, PartitionSpec()),
        out_specs=spec,
        # The body has no collectives; without this, samplers' zero-initialised loop buffers (device-invariant)
        # would need casting to the device-varying type of the values stored into them.
        check_vma=False,
    )(states, noise, context, key_data, data)


class StableDiffusionPipeline:
    """A loaded model, ready to generate. Build it with `sd_jax.load`."""

    def __init__(
        self, config: ModelConfig, states: dict, tokenizer, *, dtype=jnp.float32, mesh=None, micro_batch: int = 1
    ):
        """Args: micro_batch: images per U-Net call on each device. Images are identical for any batch size and
        device count at the same micro_batch; larger values trade padding for throughput on big accelerators."""
        if not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"micro_batch must be a positive integer, got {micro_batch!r}")
        self.micro_batch = micro_batch
        self.config = config
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.mesh = mesh if mesh is not None else parallel.batch_mesh()
        graphs = abstract_components(config, dtype)
        self._graphs = {name: graph for name, (graph, _) in graphs.items()}
        replicated = parallel.replicated(self.mesh)
        self.states = {name: jax.device_put(state, replicated) for name, state in states.items()}
        self._scheduler = scheduler_settings(config.scheduler)
        self._progress = None
        self._encode = jax.jit(
            functools.partial(_text_embeddings, self._graphs["text_encoder"]), static_argnames=("clip_skip",)
        )
        self._generate = jax.jit(
            functools.partial(_generate, self.mesh, {k: self._graphs[k] for k in ("unet", "vae")}),
            static_argnames=("static",),
        )

    @property
    def latent_factor(self) -> int:
        """Pixels per latent along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.config.vae.block_out_channels) - 1)

    def _on_step(self, sigma) -> None:
        """Host callback from the running loop: reports the step whose level is `sigma` (once per device)."""
        if self._progress is None:
            return
        report, sigmas, steps = self._progress
        hits = np.nonzero(sigmas == np.float32(sigma))[0]
        if len(hits):
            report(min(int(hits[0]) + 1, steps), steps)

    def encode_text(self, texts: Sequence[str], *, clip_skip: int = 1) -> jnp.ndarray:
        """Text-encoder embeddings (B, 77, D) of already-final prompt strings.

        Each distinct text is encoded on its own (batch 1): an embedding must not depend on which other prompts
        share the call, and batched matmuls may round differently from unbatched ones.
        """
        texts = list(texts)
        unique = list(dict.fromkeys(texts))
        ids = tokenize(self.tokenizer, unique, self.config.text_encoder.max_position_embeddings)
        encoded = {
            text: self._encode(self.states["text_encoder"], jnp.asarray(ids[i : i + 1]), clip_skip=clip_skip)[0]
            for i, text in enumerate(unique)
        }
        return jnp.stack([encoded[t] for t in texts])

    def _check(self, height, width, steps, num_images, guidance_scale, eta, seed, sampler, schedule):
        f = self.latent_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
        max_steps = self._scheduler["num_train_timesteps"]
        if not isinstance(steps, int) or not 1 <= steps <= max_steps:
            raise ValueError(f"steps must be an integer between 1 and {max_steps}, got {steps!r}")
        if not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta!r}")
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED - num_images + 1:
            raise ValueError(f"seed must be an integer in [0, 2**32 - num_images], got {seed!r}")
        samplers.check(sampler, schedule)

    def txt2img(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        height: int = 512,
        width: int = 512,
        steps: int = 50,
        guidance_scale: float = 7.5,
        sampler: str = "ddim",
        schedule: str = "default",
        eta: float = 0.0,
        seed: int = 0,
        num_images: int = 1,
        latents: np.ndarray | None = None,
        clip_skip: int = 1,
        guidance_rescale: float = 0.0,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        """Generates images from text.

        Args:
          prompt: a prompt or a list of prompts; each gives `num_images` images.
          negative_prompt: the unconditional prompt(s) of classifier-free guidance (one, or one per prompt).
          height, width: image size in pixels, multiples of 8.
          steps: denoising steps; guidance_scale: classifier-free guidance (<= 1 disables it).
          sampler, schedule, eta: see `sd_jax.sampling.samplers`.
          seed: image i of the call uses seed + i, for its starting noise and any noise its sampler draws.
          num_images: images per prompt.
          latents: optional starting noise, NCHW (n, 4, height / 8, width / 8), unit variance (the sampler scales
            it by its initial sigma), n = number of prompts * num_images.
          clip_skip: 1 uses the text encoder's last layer, 2 the penultimate, ...
          guidance_rescale: in [0, 1]; rescales the guided prediction toward the conditional one's scale
            (Lin et al. 2023, as diffusers' `guidance_rescale`).
          progress: optional callback(step, steps) called from the running loop.

        Returns:
          The images, prompt-major (all of prompt 0's images first).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        self._check(height, width, steps, num_images, guidance_scale, eta, seed, sampler, schedule)
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
        total = len(prompts) * num_images
        f = self.latent_factor
        shape = (total, self.config.unet.out_channels, height // f, width // f)
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != shape:
                raise ValueError(f"latents must have shape {shape} (NCHW), got {latents.shape}")

        cond = self.encode_text([p for p in prompts for _ in range(num_images)], clip_skip=clip_skip)
        uncond = self.encode_text([n for n in negatives for _ in range(num_images)], clip_skip=clip_skip)
        context = np.asarray(interleave(uncond, cond))
        image_keys = _image_keys(seed, total)
        if latents is None:
            latents = np.asarray(_noise(image_keys, shape[1:]))
        noise = np.transpose(latents, (0, 2, 3, 1))
        sampler_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(image_keys)

        schedule_data = samplers.schedule(sampler, schedule, self.config.scheduler, steps)
        padded = parallel.padded_batch_size(total, self.mesh.size * self.micro_batch)
        shard = parallel.batch_sharding(self.mesh)
        context = context.reshape((total, 2) + context.shape[1:])
        context = parallel.pad_batch(context, padded).reshape((2 * padded,) + context.shape[2:])
        data = LoopData(
            sigmas=schedule_data.sigmas,
            sigmas_next=schedule_data.sigmas_next,
            timesteps=schedule_data.timesteps,
            train_sigmas=schedule_data.train_sigmas,
            num_steps=np.int32(schedule_data.num_steps),
            guidance_scale=np.float32(guidance_scale),
            guidance_rescale=np.float32(guidance_rescale),
            eta=np.float32(eta),
            init_scale=np.float32(schedule_data.init_scale),
            final_scale=np.float32(schedule_data.final_scale),
        )
        static = StaticSettings(
            sampler=sampler,
            prediction_type=self._scheduler["prediction_type"],
            clip_x0=float(self._scheduler["clip_sample_range"]) if self._scheduler["clip_sample"] else None,
            latent_scale=float(self.config.vae.scaling_factor),
            latent_shift=float(self.config.vae.shift_factor or 0.0),
            micro_batch=self.micro_batch,
            progress=self._on_step if progress is not None else None,
        )
        self._progress = (progress, np.asarray(schedule_data.sigmas[: schedule_data.num_steps]), steps)
        images = self._generate(
            {k: self.states[k] for k in ("unet", "vae")},
            jax.device_put(parallel.pad_batch(noise, padded), shard),
            jax.device_put(context.astype(jnp.dtype(self.dtype)), shard),
            jax.device_put(parallel.pad_batch(np.asarray(jax.random.key_data(sampler_keys)), padded), shard),
            jax.device_put(data, parallel.replicated(self.mesh)),
            static=static,
        )
        pixels = np.asarray(jax.device_get(images))[:total]
        self._progress = None
        return [Image.fromarray(p) for p in (pixels * 255.0).round().astype(np.uint8)]


def _image_keys(seed: int, count: int) -> jnp.ndarray:
    """Typed PRNG keys of images seed, seed + 1, ..., seed + count - 1."""
    return jnp.stack([jax.random.key(seed + i) for i in range(count)])


@functools.partial(jax.jit, static_argnums=1)
def _noise(keys: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
    """Unit normal starting noise per image, NCHW, each drawn from its own image key."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
