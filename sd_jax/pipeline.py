"""The pipeline: txt2img, img2img, inpainting, outpainting and upscaling, wiring the parts together.

text -> tokens -> embeddings -> (sampler loop over the U-Net, one jit: `sd_jax.generation`) -> latents -> VAE
-> pixels; an input image enters as VAE latents, a mask as a latent mask. The batch is sharded over every device of
the mesh; weights are replicated. Image i of a call is a pure function of its prompt, its inputs, the settings and
seed + i, whatever the batch size or device count.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from sd_jax import editing, generation, parallel, tiling
from sd_jax.config import ModelConfig
from sd_jax.models import abstract_components
from sd_jax.prompts import tokenize_weighted, weighted_mean_restore
from sd_jax.sampling import samplers, schedules
from sd_jax.sampling.schedules import scheduler_settings
from sd_jax.settings import MAX_SEED, check_strength, signature

ImageInput = Image.Image | str | os.PathLike
log = logging.getLogger("sd_jax")


def _text_embeddings(graphdef, state, input_ids, *, clip_skip: int):
    return nnx.merge(graphdef, state)(input_ids, clip_skip=clip_skip)


def _vae_encode_mean(graphdef, state, images):
    return nnx.merge(graphdef, state).encode(images)[0]


def _vae_decode(graphdef, state, latents):
    return nnx.merge(graphdef, state).decode(latents)


@dataclasses.dataclass(frozen=True)
class Start:
    """What an editing call starts from besides noise (one image, host arrays, NHWC).

    Attributes:
      init: (h, w, C) the image's latents, scaled as the U-Net sees them.
      strength: how much of the schedule runs (diffusers' img2img strength): 1 starts from pure noise.
      mask: (h, w, 1) latent mask, 1 = repaint (inpainting only).
      masked: (h, w, C) latents of the image with the repainted area blanked (9-channel inpainting models).
      fill: what the repainted area starts from in latent space: "latent_noise", "latent_nothing" or as is.
    """

    init: np.ndarray
    strength: float
    mask: np.ndarray | None = None
    masked: np.ndarray | None = None
    fill: str = "original"


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
    ):
        """Args: micro_batch: images per U-Net call on each device. Images are identical for any batch size and
        device count at the same micro_batch; larger values trade padding for throughput on big accelerators.
        source: where the weights came from (a path), for the images' metadata."""
        if not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"micro_batch must be a positive integer, got {micro_batch!r}")
        self.micro_batch = micro_batch
        self.config = config
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.source = source
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
        self._emphasis = jax.jit(weighted_mean_restore)
        self._encode_image = jax.jit(functools.partial(_vae_encode_mean, self._graphs["vae"]))
        self._decode_latents = jax.jit(functools.partial(_vae_decode, self._graphs["vae"]))
        self._generate = jax.jit(
            functools.partial(generation.generate, self.mesh, {k: self._graphs[k] for k in ("unet", "vae")}),
            static_argnames=("static",),
        )

    @property
    def latent_factor(self) -> int:
        """Pixels per latent along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.config.vae.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The side in pixels the U-Net was trained at (512 for SD 1.5, 768 for SD 2.1-v, 64 for shapes64): the
        default image size."""
        return int(self.config.unet.sample_size or 64) * self.latent_factor

    def _on_step(self, sigma) -> None:
        """Host callback from the running loop: reports the step whose level is `sigma` (once per device)."""
        if self._progress is None:
            return
        report, sigmas, steps = self._progress
        hits = np.nonzero(sigmas == np.float32(sigma))[0]
        if len(hits):
            report(min(int(hits[0]) + 1, steps), steps)

    def encode_prompt(self, text: str, *, clip_skip: int = 1) -> np.ndarray:
        """The weighted text embeddings of one prompt, (n_chunks * 77, D) float32.

        AUTOMATIC1111's prompt syntax (`sd_jax.prompts`): emphasis `(word:1.3)`, `BREAK`, and prompts of any length
        in chunks of 75 tokens, each encoded on its own, weighted with the mean restored, and concatenated.
        clip_skip: 1 uses the text encoder's last layer, 2 the penultimate (then the final layer norm), ...
        """
        return np.asarray(self._prompt_chunks(text, clip_skip), np.float32).reshape(-1, self._text_width)

    @property
    def _text_width(self) -> int:
        return self.config.text_encoder.hidden_size

    def _prompt_chunks(self, text: str, clip_skip: int) -> jnp.ndarray:
        """(n_chunks, 77, D) weighted chunk embeddings of a prompt, in the pipeline's dtype.

        Every chunk is encoded alone (batch 1): an embedding must not depend on which other prompts share a call.
        The text encoder checks `clip_skip` (a one-line ValueError).
        """
        length = self.config.text_encoder.max_position_embeddings
        ids, weights = tokenize_weighted(self.tokenizer, text, chunk_length=length - 2)
        state = self.states["text_encoder"]
        chunks = jnp.concatenate(
            [self._encode(state, jnp.asarray(ids[i : i + 1]), clip_skip=clip_skip) for i in range(len(ids))]
        )
        if np.all(weights == 1.0):
            return chunks
        return self._emphasis(chunks, jnp.asarray(weights))

    def _contexts(self, positives: Sequence[str], negatives: Sequence[str], clip_skip: int):
        """Per-image [negative, positive] embeddings (n, 2, L, D) and, when padded, the token mask (n, 2, L).

        A prompt and its negative are padded to the same number of chunks with the empty prompt's chunk, as
        AUTOMATIC1111 does. All images of a call are then padded to one bucket of 1, 2, 4, 8, ... chunks with
        masked tokens, which cross-attention ignores exactly: a longer prompt compiles anew only when it crosses a
        power of two.
        """
        cache: dict[str, jnp.ndarray] = {}

        def chunks(text: str) -> jnp.ndarray:
            if text not in cache:
                cache[text] = self._prompt_chunks(text, clip_skip)
            return cache[text]

        pairs = []
        for positive, negative in zip(positives, negatives, strict=True):
            pos, neg = chunks(positive), chunks(negative)
            n = max(len(pos), len(neg))
            pos, neg = (jnp.concatenate([c] + [chunks("")] * (n - len(c))) for c in (pos, neg))
            pairs.append(jnp.stack([neg, pos]))
        counts = [len(p[0]) for p in pairs]
        bucket = 1 << (max(counts) - 1).bit_length()
        length = pairs[0].shape[2]
        contexts = np.zeros((len(pairs), 2, bucket * length, self._text_width), jnp.dtype(self.dtype))
        mask = np.zeros((len(pairs), 2, bucket * length), bool)
        for i, pair in enumerate(pairs):
            contexts[i, :, : counts[i] * length] = np.asarray(pair).reshape(2, -1, self._text_width)
            mask[i, :, : counts[i] * length] = True
        return contexts, (None if bucket == 1 else mask)

    def encode_image(self, image: np.ndarray, *, tile: bool | None = None) -> np.ndarray:
        """VAE latents (h, w, C), scaled as the U-Net sees them, of an image (H, W, 3) uint8.

        The latent distribution's mean is used (deterministic). Images over a megapixel are encoded in
        overlapping tiles (`sd_jax.tiling`) unless `tile` says otherwise.
        """
        return self._encode_pixels(editing.to_model_range(np.asarray(image)), tile=tile)

    def _encode_pixels(self, pixels: np.ndarray, *, tile: bool | None = None) -> np.ndarray:
        """`encode_image` of a model-range image (H, W, 3) in [-1, 1]."""
        vae = self.config.vae
        pixels = np.asarray(pixels, np.float32)[None]
        height, width = pixels.shape[1:3]
        state = self.states["vae"]
        if tile if tile is not None else tiling.needs_tiling(height, width):
            mean = tiling.tiled_encode(
                lambda x: self._encode_image(state, jnp.asarray(x, self.dtype)), pixels, factor=self.latent_factor
            )
        else:
            mean = self._encode_image(state, jnp.asarray(pixels, self.dtype))
        mean = np.asarray(mean, np.float32)[0]
        return (mean - float(vae.shift_factor or 0.0)) * float(vae.scaling_factor)

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        """Images (B, H, W, 3) in [0, 1] from raw VAE latents (B, h, w, C), decoded in overlapping tiles."""
        state = self.states["vae"]
        images = tiling.tiled_decode(
            lambda z: self._decode_latents(state, jnp.asarray(z, self.dtype)), latents, factor=self.latent_factor
        )
        return np.clip(np.asarray(images, np.float32) / 2.0 + 0.5, 0.0, 1.0)

    def _check(self, height, width, steps, num_images, guidance_scale, eta, seed, sampler, schedule):
        self._check_size(height, width)
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

    @signature("txt2img", (_LATENTS, _PROGRESS))
    def txt2img(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        height: int | None = None,
        width: int | None = None,
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
          progress: optional callback(step, steps) called from the running loop.

        Returns:
          The images, prompt-major (all of prompt 0's images first).
        """
        pixels = self._run(
            prompt,
            negative_prompt,
            height=self.native_size if height is None else height,
            width=self.native_size if width is None else width,
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            schedule=schedule,
            eta=eta,
            seed=seed,
            num_images=num_images,
            latents=latents,
            clip_skip=clip_skip,
            guidance_rescale=guidance_rescale,
            progress=progress,
        )
        return [Image.fromarray(p) for p in pixels]

    @signature("img2img", (_IMAGE, _LATENTS, _PROGRESS))
    def img2img(
        self,
        prompt: str | Sequence[str],
        image: ImageInput,
        *,
        negative_prompt: str | Sequence[str] = "",
        strength: float = 0.75,
        height: int | None = None,
        width: int | None = None,
        tile: bool | None = None,
        **options,
    ) -> list[Image.Image]:
        """Redraws an image under a prompt, keeping as much of it as `strength` leaves.

        Args:
          image: a PIL image or a path. It is resized (Lanczos) to height x width when given; otherwise its own
            size is used, rounded down to multiples of 8 (a resize that is logged).
          strength: in [0, 1], as diffusers' img2img: the schedule is entered at step
            steps - int(steps * strength); 0 returns the image's VAE round trip, 1 starts from pure noise and
            ignores the image's content (the same image as txt2img with the same seed).
          tile: encode and decode with the VAE in overlapping tiles (default: above a megapixel).
          **options: as txt2img (steps, guidance_scale, sampler, schedule, eta, seed, num_images, latents,
            clip_skip, guidance_rescale, progress).
        """
        check_strength(strength)
        image = editing.load_image(image, "init image")
        if height is None and width is None:
            width, height = editing.round_size(*image.size, self.latent_factor)
            if (width, height) != image.size:
                log.warning(
                    "init image %dx%d is resized to %dx%d: sizes must be multiples of %d",
                    *image.size,
                    width,
                    height,
                    self.latent_factor,
                )
        elif height is None or width is None:
            raise ValueError("give both height and width, or neither (the image's own size)")
        self._check_size(height, width)
        if (width, height) != image.size:
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        start = Start(init=self.encode_image(np.asarray(image), tile=tile), strength=strength)
        pixels = self._run(prompt, negative_prompt, height=height, width=width, start=start, tile=tile, **options)
        return [Image.fromarray(p) for p in pixels]

    @signature("inpaint", (_IMAGE, _MASK, _LATENTS, _PROGRESS))
    def inpaint(
        self,
        prompt: str | Sequence[str],
        image: ImageInput,
        mask: ImageInput | np.ndarray,
        *,
        negative_prompt: str | Sequence[str] = "",
        strength: float = 1.0,
        mask_blur: float = 4,
        only_masked: bool = False,
        padding: int = 32,
        fill: str = "original",
        height: int | None = None,
        width: int | None = None,
        **options,
    ) -> list[Image.Image]:
        """Repaints the white area of `mask`; every pixel outside it (and its blur) is kept exactly.

        A 9-channel inpainting model sees the mask and the masked image's latents (diffusers'
        StableDiffusionInpaintPipeline); any other model has its known region reset to the image's latents,
        noised to the current level, after every step. Either way the result is pasted onto the original with
        the blurred mask as alpha.

        Args:
          image: a PIL image or a path, any size (padded to multiples of 8 by edge replication for the model).
          mask: the same size as the image; white (>= 0.5) is repainted.
          strength: as img2img; 1 (default) starts the repainted area from pure noise.
          mask_blur: Gaussian blur radius in pixels of the mask (the seam of the paste-back).
          only_masked: work on the mask's bounding box plus `padding` pixels, resized to height x width
            (default: the model's native size), and paste the result back into the full image.
          fill: what the repainted area starts from when strength < 1: "original" (the image), "noise" (random
            pixels), "latent_noise" (random latents), "latent_nothing" (zero latents).
          height, width: with only_masked, the processing size (multiples of 8); otherwise ignored.
          **options: as txt2img.
        """
        check_strength(strength)
        editing.check_fill(fill)
        if not np.isfinite(mask_blur) or mask_blur < 0:
            raise ValueError(f"mask_blur must be a non-negative number, got {mask_blur!r}")
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative integer, got {padding!r}")
        image = editing.load_image(image, "image")
        mask = editing.load_mask(mask, image.size)
        alpha = editing.blur_mask(mask, mask_blur)
        return self._inpaint_arrays(
            prompt,
            np.asarray(image),
            alpha,
            negative_prompt=negative_prompt,
            strength=strength,
            fill=fill,
            only_masked=only_masked,
            padding=padding,
            height=height,
            width=width,
            **options,
        )

    @signature("outpaint", (_IMAGE, _LATENTS, _PROGRESS))
    def outpaint(
        self,
        prompt: str | Sequence[str],
        image: ImageInput,
        *,
        negative_prompt: str | Sequence[str] = "",
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        seam: int = 8,
        strength: float | None = None,
        **options,
    ) -> list[Image.Image]:
        """Extends the canvas by the given margins (multiples of 8 pixels) and paints the new area.

        The new area starts from the image's edges stretched outward plus noise, the mask covers it and a soft
        seam of `seam` pixels into the image, and the result is inpainted; pixels of the image further than `seam`
        from its border are kept exactly.

        Args:
          strength: default 1 for 9-channel inpainting models (which see the known image), 0.8 for other models
            (which then start from the stretched edges).
          **options: as txt2img (the seed also draws the fill's noise).
        """
        image = editing.load_image(image, "image")
        editing.check_multiple(*image.size, self.latent_factor, what="the image to outpaint")
        if strength is None:
            strength = 1.0 if self.config.is_inpainting else 0.8
        check_strength(strength)
        seed = options.get("seed", 0)
        canvas, _, alpha = editing.extend_canvas(
            np.asarray(image), left, right, top, bottom, seam=seam, rng=np.random.default_rng(seed)
        )
        return self._inpaint_arrays(
            prompt, canvas, alpha, negative_prompt=negative_prompt, strength=strength, fill="original", **options
        )

    @signature("upscale", (_IMAGE, _LATENTS, _PROGRESS))
    def upscale(
        self,
        prompt: str | Sequence[str],
        image: ImageInput,
        *,
        negative_prompt: str | Sequence[str] = "",
        scale: float = 2.0,
        strength: float = 0.35,
        tile: bool | None = None,
        **options,
    ) -> list[Image.Image]:
        """ "Hires fix": a Lanczos resize by `scale` (to multiples of 8), then img2img at `strength`.

        The VAE encodes and decodes large images in overlapping tiles (see `tile` in img2img).
        """
        image = editing.load_image(image, "image")
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        f = self.latent_factor
        width, height = (max(f, int(round(side * scale / f)) * f) for side in image.size)
        image = image.resize((width, height), Image.Resampling.LANCZOS)
        return self.img2img(prompt, image, negative_prompt=negative_prompt, strength=strength, tile=tile, **options)

    def _inpaint_arrays(
        self,
        prompt,
        image: np.ndarray,
        alpha: np.ndarray,
        *,
        negative_prompt,
        strength: float,
        fill: str,
        only_masked: bool = False,
        padding: int = 32,
        height: int | None = None,
        width: int | None = None,
        **options,
    ) -> list[Image.Image]:
        """Inpaints `image` (H, W, 3) uint8 where the soft mask `alpha` (H, W) is set, then pastes back."""
        if not (alpha >= 0.5).any():  # e.g. a mask of a few pixels, blurred below one half
            raise ValueError(editing.EMPTY_MASK)
        generated = self._inpaint_raw(
            prompt,
            image,
            alpha,
            negative_prompt=negative_prompt,
            strength=strength,
            fill=fill,
            only_masked=only_masked,
            padding=padding,
            height=height,
            width=width,
            **options,
        )
        if only_masked:
            region, pieces = generated
            return [Image.fromarray(editing.paste_crop(image, piece, region, alpha)) for piece in pieces]
        return [Image.fromarray(editing.paste_back(image, g, alpha)) for g in generated]

    def _inpaint_raw(
        self,
        prompt,
        image: np.ndarray,
        alpha: np.ndarray,
        *,
        negative_prompt="",
        strength: float = 1.0,
        fill: str = "original",
        only_masked: bool = False,
        padding: int = 32,
        height: int | None = None,
        width: int | None = None,
        **options,
    ):
        """The model's images before paste-back: (B, H, W, 3) uint8 at the image's size, or with only_masked
        ((x0, y0, x1, y1), the crops at the processing size)."""
        f = self.latent_factor
        region = None
        if only_masked:
            width = self.native_size if width is None else width
            height = self.native_size if height is None else height
            self._check_size(height, width)
            region = editing.crop_region(alpha, padding, width, height)
            x0, y0, x1, y1 = region
            crop = Image.fromarray(image[y0:y1, x0:x1]).resize((width, height), Image.Resampling.LANCZOS)
            crop_alpha = Image.fromarray(alpha[y0:y1, x0:x1].astype(np.float32), mode="F")
            work_image = np.asarray(crop)
            work_alpha = np.clip(np.asarray(crop_alpha.resize((width, height), Image.Resampling.BILINEAR)), 0, 1)
        else:
            # Pad to multiples of the latent factor by edge replication; the padding is known (mask 0).
            h, w = alpha.shape
            ph, pw = -h % f, -w % f
            work_image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="edge")
            work_alpha = np.pad(alpha, ((0, ph), (0, pw)))
        height, width = work_alpha.shape
        seed = options.get("seed", 0)
        work_image = editing.fill_masked(work_image, work_alpha, fill, np.random.default_rng(seed))
        concat = self.config.is_inpainting
        latent_mask = editing.latent_mask(work_alpha, f, binary=concat)
        if not concat:
            latent_mask = np.round(latent_mask)  # a soft edge is the pixel paste-back's job
        masked = None
        if concat:
            masked_pixels = editing.masked_image(work_image, work_alpha)
            masked = self._encode_pixels(masked_pixels)
        start = Start(
            init=self.encode_image(work_image),
            strength=strength,
            mask=latent_mask[..., None].astype(np.float32),
            masked=masked,
            fill=fill,
        )
        pixels = self._run(prompt, negative_prompt, height=height, width=width, start=start, **options)
        if only_masked:
            return region, pixels
        return pixels[:, : image.shape[0], : image.shape[1]]

    def _check_size(self, height: int, width: int) -> None:
        f = self.latent_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")

    def _run(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        height: int,
        width: int,
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
        start: Start | None = None,
        tile: bool | None = None,
    ) -> np.ndarray:
        """Every mode's generation: images (n, height, width, 3) uint8, prompt-major."""
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

        contexts, context_mask = self._contexts(
            [p for p in prompts for _ in range(num_images)],
            [n for n in negatives for _ in range(num_images)],
            clip_skip,
        )
        image_keys = _image_keys(seed, total)
        if latents is None:
            latents = np.asarray(_noise(image_keys, shape[1:]))
        inputs = {"noise": np.transpose(latents, (0, 2, 3, 1))}
        sampler_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(image_keys)

        schedule_data = samplers.schedule(sampler, schedule, self.config.scheduler, steps)
        init_weight = 0.0
        inpaint = None
        if start is not None:
            entry = schedules.img2img_start(steps, start.strength)
            if entry == steps:  # no step left (PLMS's schedule has one more entry than steps)
                entry = schedule_data.num_steps
            if entry > 0:  # strength 1 starts from pure noise, as txt2img
                schedule_data = schedules.enter_schedule(schedule_data, entry)
                init_weight = 1.0
            inputs.update(self._start_inputs(start, image_keys, total))
            if start.mask is not None:
                inpaint = generation.CONCAT if self.config.is_inpainting else generation.BLEND
        decode = not (tile if tile is not None else tiling.needs_tiling(height, width))

        padded = parallel.padded_batch_size(total, self.mesh.size * self.micro_batch)
        shard = parallel.batch_sharding(self.mesh)

        def interleaved(per_image: np.ndarray) -> jax.Array:
            # (total, 2, ...) -> [u0, c0, u1, c1, ...] (2 * padded, ...), sharded with the images.
            per_image = parallel.pad_batch(per_image, padded)
            return jax.device_put(per_image.reshape((2 * padded,) + per_image.shape[2:]), shard)

        context = interleaved(contexts)
        if context_mask is not None:
            context = (context, interleaved(context_mask))
        data = generation.LoopData(
            sigmas=schedule_data.sigmas,
            sigmas_next=schedule_data.sigmas_next,
            timesteps=schedule_data.timesteps,
            train_sigmas=schedule_data.train_sigmas,
            num_steps=np.int32(schedule_data.num_steps),
            guidance_scale=np.float32(guidance_scale),
            guidance_rescale=np.float32(guidance_rescale),
            eta=np.float32(eta),
            init_scale=np.float32(schedule_data.init_scale),
            init_weight=np.float32(init_weight),
            final_scale=np.float32(schedule_data.final_scale),
        )
        static = generation.StaticSettings(
            sampler=sampler,
            prediction_type=self._scheduler["prediction_type"],
            clip_x0=float(self._scheduler["clip_sample_range"]) if self._scheduler["clip_sample"] else None,
            latent_scale=float(self.config.vae.scaling_factor),
            latent_shift=float(self.config.vae.shift_factor or 0.0),
            micro_batch=self.micro_batch,
            progress=self._on_step if progress is not None else None,
            inpaint=inpaint,
            decode=decode,
        )
        self._progress = (
            progress,
            np.asarray(schedule_data.sigmas[: schedule_data.num_steps]),
            min(steps, schedule_data.num_steps),
        )
        try:
            out = self._generate(
                {k: self.states[k] for k in ("unet", "vae")},
                {k: jax.device_put(parallel.pad_batch(v, padded), shard) for k, v in inputs.items()},
                context,
                jax.device_put(parallel.pad_batch(np.asarray(jax.random.key_data(sampler_keys)), padded), shard),
                jax.device_put(data, parallel.replicated(self.mesh)),
                static=static,
            )
            out = np.asarray(jax.device_get(out))[:total]
        finally:
            self._progress = None
        pixels = out if decode else self.decode_latents(out)
        return (pixels * 255.0).round().astype(np.uint8)

    def _start_inputs(self, start: Start, image_keys, total: int) -> dict[str, np.ndarray]:
        """The per-image arrays (total, h, w, .) of an editing call: image latents, mask, masked latents."""
        init = np.broadcast_to(start.init, (total,) + start.init.shape)
        if start.mask is not None and start.fill in ("latent_noise", "latent_nothing"):
            keep = 1.0 - start.mask
            init = init * keep
            if start.fill == "latent_noise":
                fill_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(image_keys)
                noise = np.asarray(_noise(fill_keys, (start.init.shape[2],) + start.init.shape[:2]))
                init = init + np.transpose(noise, (0, 2, 3, 1)) * start.mask
        inputs = {"init": np.ascontiguousarray(init, np.float32)}
        if start.mask is not None:
            inputs["mask"] = np.broadcast_to(start.mask, (total,) + start.mask.shape).astype(np.float32)
        if start.masked is not None:
            inputs["masked"] = np.broadcast_to(start.masked, (total,) + start.masked.shape).astype(np.float32)
        return inputs


def _image_keys(seed: int, count: int) -> jnp.ndarray:
    """Typed PRNG keys of images seed, seed + 1, ..., seed + count - 1."""
    return jnp.stack([jax.random.key(seed + i) for i in range(count)])


@functools.partial(jax.jit, static_argnums=1)
def _noise(keys: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
    """Unit normal starting noise per image, NCHW, each drawn from its own image key."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
