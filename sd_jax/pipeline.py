"""The pipeline: txt2img, img2img, inpainting, outpainting and upscaling, wiring the parts together.

settings -> prompts (`sd_jax.conditioning`) -> the mode's start (`sd_jax.starts`) -> per-image keys and noise ->
one compiled call (`sd_jax.generation`) -> pixels -> the mode's finish (paste-back). The batch is sharded over every
device of the mesh; weights are replicated. Image i of a request is a pure function of its prompt, its inputs, the
settings and seed + i, whatever the batch size, the device count or the other requests sharing its call.

    pipe = sd_jax.load()
    images = pipe.txt2img("a red circle on a blue background", steps=20)
    images = pipe.generate(GenerationSettings(prompt="a blue square", steps=20))
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sd_jax import generation, lora, parallel, starts, tiling
from sd_jax.conditioning import PromptEncoder
from sd_jax.config import ModelConfig
from sd_jax.embeddings import EmbeddingLibrary
from sd_jax.latents import LatentCodec
from sd_jax.lora import tags as lora_tags
from sd_jax.lora.library import LoRALibrary
from sd_jax.lora.tags import LoRAUse
from sd_jax.models import abstract_components
from sd_jax.sampling import samplers, schedules
from sd_jax.sampling.schedules import scheduler_settings
from sd_jax.settings import GenerationSettings, signature

ImageInput = Image.Image | str | os.PathLike


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request ready for the compiled program: its images' arrays, the program they need, and its finish.

    Requests whose `group_key`s agree can share one call: `generation.concatenate` their batches, `sample` once,
    and hand each request's rows of the pixels to its own `finish`.
    """

    settings: GenerationSettings
    batch: generation.Batch
    static: generation.StaticSettings
    finish: Callable[[np.ndarray], list[Image.Image]]
    loras: tuple = ()  # the LoRA files (stamps) and weights its weights need: `StableDiffusionPipeline.lora_key`

    @property
    def group_key(self) -> tuple:
        """The program, shapes and weights the request needs; with micro-batches of several images also its loop
        data (the images of one micro-batch walk one loop: `generation.LoopData`)."""
        key = (self.static, self.batch.shape_key, self.loras)
        if self.static.micro_batch > 1:
            key += (b"".join(np.ascontiguousarray(a[0]).tobytes() for a in jax.tree.leaves(self.batch.data)),)
        return key


_P = inspect.Parameter
_IMAGE = _P("image", _P.POSITIONAL_OR_KEYWORD)
_MASK = _P("mask", _P.POSITIONAL_OR_KEYWORD)
_LATENTS = _P("latents", _P.KEYWORD_ONLY, default=None)
_PROGRESS = _P("progress", _P.KEYWORD_ONLY, default=None)


class StableDiffusionPipeline:
    """A loaded model, ready to generate. Build it with `sd_jax.load`."""

    def __init__(
        self,
        config: ModelConfig,
        states: dict,
        tokenizer,
        *,
        dtype=jnp.float32,
        mesh=None,
        micro_batch: int = 1,
        source: str | None = None,
        lora_dir: str | os.PathLike | None = None,
        embeddings_dir: str | os.PathLike | None = None,
    ):
        """Args: micro_batch: images per U-Net call on each device. Images are identical for any batch size and
        device count at the same micro_batch; larger values trade padding for throughput on big accelerators.
        source: where the weights came from (a path), for the images' metadata.
        lora_dir: the folder `<lora:NAME:WEIGHT>` names files of (`sd_jax.lora.library`).
        embeddings_dir: the folder of textual-inversion embeddings prompts name (`sd_jax.embeddings`)."""
        if not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"micro_batch must be a positive integer, got {micro_batch!r}")
        self.micro_batch = micro_batch
        self.config = config
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.source = source
        self.mesh = mesh if mesh is not None else parallel.batch_mesh()
        graphs = {name: graph for name, (graph, _) in abstract_components(config, dtype).items()}
        self.prompts = PromptEncoder(graphs["text_encoder"], None, tokenizer, config.text_encoder, dtype)
        if embeddings_dir is not None:
            self.prompts.embeddings = EmbeddingLibrary(embeddings_dir)
        self.loras = LoRALibrary(lora_dir)
        self.vae = LatentCodec(graphs["vae"], config.vae, dtype, self.latent_factor)
        self.states = states
        self._scheduler = scheduler_settings(config.scheduler)
        self.program = generation.Program(self.mesh, {k: graphs[k] for k in ("unet", "vae")})

    @property
    def states(self) -> dict:
        """The components' base weights ("text_encoder", "unet", "vae"), replicated over the mesh; a request's LoRAs
        are added to them for that request only (`with_loras`)."""
        return self._states

    @states.setter
    def states(self, states: dict) -> None:
        replicated = parallel.replicated(self.mesh)
        self._states = {name: jax.device_put(state, replicated) for name, state in states.items()}
        self._lora_states = ((), self._states)
        self.prompts.state = self._states["text_encoder"]
        self.vae.state = self._states["vae"]

    # -- LoRA ---------------------------------------------------------------------------------------------------------
    def lora_key(self, uses: Sequence[LoRAUse]) -> tuple:
        """The files and weights of LoRA uses: ((resolved path, size, mtime), te weight, unet weight) per use with a
        non-zero weight. Resolving a name that no file has is a one-line `LoRAError`; nothing is read."""
        return tuple(
            (self.loras.stamp(use.name), use.te_weight, use.unet_weight)
            for use in uses
            if use.te_weight or use.unet_weight
        )

    def with_loras(self, key: tuple) -> dict:
        """The weights with the LoRAs of `lora_key` added (the base weights for ()). The last set's are kept, so
        the images of one LoRA set in a row pay for the addition once; the base weights never change."""
        if self._lora_states[0] != key:
            files = [(self.loras.read(stamp[0]), te, unet) for stamp, te, unet in key]
            self._lora_states = (key, lora.apply_loras(self._states, files) if files else self._states)
        return self._lora_states[1]

    def lora_uses(self, settings: GenerationSettings) -> tuple[tuple[LoRAUse, ...], list[str], list[str]]:
        """A request's LoRAs (its `loras`, then its prompts' `<lora:...>` tags) and its prompts without the tags.

        Every prompt of a request shares one set of weights, so its (prompt, negative prompt) pairs must name the
        same LoRAs; the web UI would apply the first pair's to all, silently."""
        positives, negatives, named = [], [], None
        for positive, negative in zip(settings.prompts, settings.negative_prompts, strict=True):
            positive, uses = lora_tags.extract(positive)
            negative, negative_uses = lora_tags.extract(negative)
            uses = lora_tags.merge(uses + negative_uses)
            if named is not None and set(uses) != set(named):
                raise ValueError("the prompts of one request name different <lora:...> tags: give each its request")
            named = uses
            positives.append(positive)
            negatives.append(negative)
        explicit = [lora_tags.LoRAUse(name, te, unet) for name, te, unet in settings.loras]
        return lora_tags.merge(explicit + list(named or ())), positives, negatives

    @property
    def latent_factor(self) -> int:
        """Pixels per latent along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.config.vae.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The side in pixels the U-Net was trained at (512 for SD 1.5, 768 for SD 2.1-v, 64 for shapes64): the
        default image size."""
        return int(self.config.unet.sample_size or 64) * self.latent_factor

    # -- the parts ------------------------------------------------------------------------------------------------
    def encode_prompt(self, text: str, *, clip_skip: int = 1) -> np.ndarray:
        """The weighted text embeddings of one prompt, (n_chunks * 77, D) float32 (see `sd_jax.conditioning`).

        clip_skip: 1 uses the text encoder's last layer, 2 the penultimate (then the final layer norm), ...
        """
        chunks = self.prompts.chunks(text, clip_skip)
        return np.asarray(chunks, np.float32).reshape(-1, self.config.text_encoder.hidden_size)

    def encode_image(self, image: np.ndarray, *, tile: bool | None = None) -> np.ndarray:
        """VAE latents (h, w, C), scaled as the U-Net sees them, of an image (H, W, 3) uint8 (see
        `sd_jax.latents`; tiled above a megapixel unless `tile` says otherwise)."""
        return self.vae.encode_image(image, tile)

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        """Images (B, H, W, 3) in [0, 1] from raw VAE latents (B, h, w, C), decoded in overlapping tiles."""
        return self.vae.decode(latents)

    def _check_size(self, height: int, width: int) -> None:
        f = self.latent_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")

    # -- a request, start to finish -------------------------------------------------------------------------------
    def group_key(self, settings: GenerationSettings, image: ImageInput | None = None, mask=None) -> tuple:
        """`prepare(...).group_key` without running a model (the prompts are tokenized and the images opened; the
        encoders' outputs are stood in for by zeros of their shapes): requests with equal keys can share a call."""
        return self.prepare(settings, image, mask, _dry=True).group_key

    def prepare(
        self, settings: GenerationSettings, image: ImageInput | None = None, mask=None, *, latents=None, _dry=False
    ) -> Prepared:
        """Everything of a request up to the compiled call: checks, text embeddings, the mode's start, keys, noise.

        Args:
          settings: the request (validated here, then checked against the model: steps, size).
          image, mask: the input image of an editing mode (PIL image or path) and inpainting's mask.
          latents: optional starting noise, NCHW (n, C, h, w), unit variance; default: drawn from each image's seed.
        """
        settings = settings.validate()
        max_steps = self._scheduler["num_train_timesteps"]
        if settings.steps > max_steps:
            raise ValueError(f"steps must be an integer between 1 and {max_steps}, got {settings.steps!r}")
        f = self.latent_factor
        encode = self.vae.encode
        if _dry:
            channels = self.config.vae.latent_channels
            encode = lambda pixels, tile: np.zeros((pixels.shape[0] // f, pixels.shape[1] // f, channels))  # noqa: E731
        edit_model = starts.EditModel(f, self.native_size, self.config.is_inpainting, encode, self._check_size)
        uses, prompts, negative_prompts = self.lora_uses(settings)
        loras = self.lora_key(uses)
        canvas = starts.prepare(settings, image, mask, edit_model)
        n_each = settings.num_images
        positives = [p for p in prompts for _ in range(n_each)]
        negatives = [p for p in negative_prompts for _ in range(n_each)]
        n = len(positives)
        if _dry:
            contexts, context_mask = self.prompts.shapes_only(zip(positives, negatives, strict=True))
        else:
            text_encoder = self.with_loras(loras)["text_encoder"]
            if self.prompts.state is not text_encoder:
                self.prompts.state = text_encoder
            contexts, context_mask = self.prompts.contexts(positives, negatives, settings.clip_skip)
        keys = generation.image_keys(range(settings.seed, settings.seed + n))
        shape = (n, self.config.unet.out_channels, canvas.height // f, canvas.width // f)
        if latents is None:
            latents = np.zeros(shape, np.float32) if _dry else generation.unit_noise(keys.noise, shape[1:])
        latents = np.asarray(latents, np.float32)
        if latents.shape != shape:
            raise ValueError(f"latents must have shape {shape} (NCHW), got {latents.shape}")
        inputs = {"noise": np.transpose(latents, (0, 2, 3, 1))}

        schedule = samplers.schedule(settings.sampler, settings.schedule, self.config.scheduler, settings.steps)
        init_weight, inpaint = 0.0, None
        if canvas.start is not None:
            entry = schedules.img2img_start(settings.steps, canvas.start.strength)
            if entry == settings.steps:  # no step left (PLMS's schedule has one more entry than steps)
                entry = schedule.num_steps
            if entry > 0:  # strength 1 starts from pure noise, as txt2img
                schedule = schedules.enter_schedule(schedule, entry)
                init_weight = 1.0
            inputs.update(starts.start_inputs(canvas.start, keys.fill, n))
            if canvas.start.mask is not None:
                inpaint = generation.CONCAT if self.config.is_inpainting else generation.BLEND
        data = generation.LoopData.rows(
            n,
            schedule,
            guidance_scale=settings.guidance_scale,
            guidance_rescale=settings.guidance_rescale,
            eta=settings.eta,
            init_weight=init_weight,
        )
        tile = settings.tile if settings.mode in ("img2img", "upscale") else None
        static = generation.StaticSettings(
            sampler=settings.sampler,
            prediction_type=self._scheduler["prediction_type"],
            clip_x0=float(self._scheduler["clip_sample_range"]) if self._scheduler["clip_sample"] else None,
            latent_scale=float(self.config.vae.scaling_factor),
            latent_shift=float(self.config.vae.shift_factor or 0.0),
            micro_batch=self.micro_batch,
            inpaint=inpaint,
            decode=not (tile if tile is not None else tiling.needs_tiling(canvas.height, canvas.width)),
        )
        key_data = np.asarray(jax.random.key_data(keys.sampler))
        batch = generation.Batch(inputs, contexts, context_mask, key_data, data)
        return Prepared(settings, batch, static, canvas.finish, loras)

    def sample(
        self,
        batch: generation.Batch,
        static: generation.StaticSettings,
        progress: Callable[[int, int], None] | None = None,
        *,
        pad_to: int = 0,
        loras: tuple = (),
    ) -> np.ndarray:
        """The compiled call on a batch (one request's, or several requests' concatenated): uint8 pixels
        (n, H, W, 3) before any mode's finish (`pad_to`: see `generation.Program.run`; `loras`: the requests'
        `Prepared.loras`). LoRAs change the weights the program is given, never the program."""
        weights = self.with_loras(loras)
        states = {k: weights[k] for k in ("unet", "vae")}
        out = self.program.run(states, batch, static, progress, pad_to=pad_to)
        if static.decode and jnp.dtype(self.dtype) == jnp.float16 and not np.isfinite(out).all():
            # The float16 VAE overflowed inside the program: sample again, keep the latents, and let the codec
            # decode them (in float32 where float16 overflows).
            static = dataclasses.replace(static, decode=False)
            out = self.program.run(states, batch, static, None, pad_to=pad_to)
        pixels = out if static.decode else self.decode_latents(out)
        return (pixels * 255.0).round().astype(np.uint8)

    def generate(
        self,
        settings: GenerationSettings,
        image: ImageInput | None = None,
        mask=None,
        *,
        latents=None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        """The images of a request, prompt-major (all of prompt 0's images first).

        progress: optional callback(done, total) from the running loop, once per sampler step (of the first
        device's share of the images; total = steps x its images).
        """
        prepared = self.prepare(settings, image, mask, latents=latents)
        return prepared.finish(self.sample(prepared.batch, prepared.static, progress, loras=prepared.loras))

    def _request(self, mode: str, prompt, image=None, mask=None, *, latents=None, progress=None, **options):
        settings = GenerationSettings.for_mode(mode, prompt=prompt, **options)
        return self.generate(settings, image, mask, latents=latents, progress=progress)

    # -- the modes ------------------------------------------------------------------------------------------------
    @signature("txt2img", (_LATENTS, _PROGRESS))
    def txt2img(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", **options):
        """Generates images from text.

        Args:
          prompt: a prompt or a list of prompts; each gives `num_images` images.
          negative_prompt: the unconditional prompt(s) of classifier-free guidance (one, or one per prompt).
          height, width: image size in pixels, multiples of 8; default (None): the model's native size.
          steps: denoising steps; guidance_scale: classifier-free guidance (<= 1 disables it).
          sampler, schedule, eta: see `sd_jax.sampling.samplers`.
          seed: image i of the call uses seed + i, for its starting noise and any noise its sampler draws.
          num_images: images per prompt.
          latents: optional starting noise, NCHW (n, 4, height / 8, width / 8), unit variance (the sampler scales
            it by its initial sigma), n = number of prompts * num_images.
          clip_skip: 1 uses the text encoder's last layer, 2 the penultimate, ...
          guidance_rescale: in [0, 1]; rescales the guided prediction toward the conditional one's scale
            (Lin et al. 2023, as diffusers' `guidance_rescale`).
          progress: optional callback(done, total) called from the running loop once per sampler step.

        Returns:
          The images, prompt-major (all of prompt 0's images first).
        """
        return self._request("txt2img", prompt, negative_prompt=negative_prompt, **options)

    @signature("img2img", (_IMAGE, _LATENTS, _PROGRESS))
    def img2img(self, prompt: str | Sequence[str], image: ImageInput, **options) -> list[Image.Image]:
        """Redraws an image under a prompt, keeping as much of it as `strength` leaves.

        Args:
          image: a PIL image or a path. It is resized (Lanczos) to height x width when given; otherwise its own
            size is used, rounded down to multiples of 8 (a resize that is logged).
          strength: in [0, 1], as diffusers' img2img: the schedule is entered at step
            steps - int(steps * strength); 0 returns the image's VAE round trip, 1 starts from pure noise and
            ignores the image's content (the same image as txt2img with the same seed).
          tile: encode and decode with the VAE in overlapping tiles (default: above a megapixel).
          **options: as txt2img.
        """
        return self._request("img2img", prompt, image, **options)

    @signature("inpaint", (_IMAGE, _MASK, _LATENTS, _PROGRESS))
    def inpaint(self, prompt: str | Sequence[str], image: ImageInput, mask, **options) -> list[Image.Image]:
        """Repaints the white area of `mask`; every pixel outside it (and its blur) is kept exactly.

        A 9-channel inpainting model sees the mask and the masked image's latents (diffusers'
        StableDiffusionInpaintPipeline); any other model has its known region reset to the image's latents,
        noised to the current level, after every step. Either way the result is pasted onto the original with
        the blurred mask as alpha.

        Args:
          image: a PIL image or a path, any size (padded to multiples of 8 by edge replication for the model).
          mask: the same size as the image (image, path or array; see `editing.load_mask`); white is repainted.
          strength: as img2img; 1 (default) starts the repainted area from pure noise.
          mask_blur: Gaussian blur radius in pixels of the mask (the seam of the paste-back).
          only_masked: work on the mask's bounding box plus `padding` pixels, resized to height x width
            (default: the model's native size), and paste the result back into the full image.
          fill: what the repainted area starts from when strength < 1: "original" (the image), "noise" (random
            pixels), "latent_noise" (random latents), "latent_nothing" (zero latents).
          height, width: with only_masked, the processing size (multiples of 8); otherwise ignored.
          **options: as txt2img.
        """
        return self._request("inpaint", prompt, image, mask, **options)

    @signature("outpaint", (_IMAGE, _LATENTS, _PROGRESS))
    def outpaint(self, prompt: str | Sequence[str], image: ImageInput, **options) -> list[Image.Image]:
        """Extends the canvas by the given margins (multiples of 8 pixels) and paints the new area.

        The new area starts from the image's edges stretched outward plus noise, the mask covers it and a soft
        seam of `seam` pixels into the image, and the result is inpainted; pixels of the image further than `seam`
        from its border are kept exactly.

        Args:
          strength: default 1 for 9-channel inpainting models (which see the known image), 0.8 for other models
            (which then start from the stretched edges).
          **options: as txt2img (the seed also draws the fill's noise).
        """
        return self._request("outpaint", prompt, image, **options)

    @signature("upscale", (_IMAGE, _LATENTS, _PROGRESS))
    def upscale(self, prompt: str | Sequence[str], image: ImageInput, **options) -> list[Image.Image]:
        """ "Hires fix": a Lanczos resize by `scale` (to multiples of 8), then img2img at `strength`.

        The VAE encodes and decodes large images in overlapping tiles (see `tile` in img2img).
        """
        return self._request("upscale", prompt, image, **options)
