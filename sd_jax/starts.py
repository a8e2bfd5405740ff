"""How each mode begins and ends: its input image and mask turned into the loop's start, and the generated pixels
turned into the mode's images.

`prepare(settings, image, mask, model)` gives a `Canvas`: the size the model generates at, the `Start` (the image's
latents, the strength, a latent mask) and `finish`, which pastes inpainted pixels back onto the original. The
geometry is `sd_jax.editing`'s (pure numpy); this module only adds the VAE encoder, given as a function.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax
import numpy as np
from PIL import Image

from sd_jax import editing, generation
from sd_jax.settings import GenerationSettings

log = logging.getLogger("sd_jax")


@dataclasses.dataclass(frozen=True)
class Start:
    """What an editing request starts from besides noise (one image, host arrays, NHWC).

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


@dataclasses.dataclass(frozen=True)
class EditModel:
    """What preparation needs of a model.

    Attributes:
      factor: pixels per latent along a side (8).
      native_size: the default side in pixels.
      is_inpainting: a 9-channel inpainting U-Net.
      encode: `(pixels (H, W, 3) float32 in [-1, 1], tile) -> latents (h, w, C)` scaled as the U-Net sees them.
      check_size: `(height, width) -> None`, raises for a size the model cannot generate.
    """

    factor: int
    native_size: int
    is_inpainting: bool
    encode: Callable[[np.ndarray, bool | None], np.ndarray]
    check_size: Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class Canvas:
    """Where a request's images are generated and how they become its result.

    Attributes:
      height, width: the generated size in pixels.
      start: None for txt2img.
      finish: uint8 pixels (n, height, width, 3) -> the mode's images.
    """

    height: int
    width: int
    start: Start | None
    finish: Callable[[np.ndarray], list[Image.Image]]


def _as_images(pixels: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(p) for p in pixels]


def prepare(settings: GenerationSettings, image, mask, model: EditModel) -> Canvas:
    """The canvas of a validated request; image and mask are PIL images, paths or arrays (mask: see
    `editing.load_mask`), None for txt2img."""
    mode = settings.mode
    if mode == "txt2img":
        height = model.native_size if settings.height is None else settings.height
        width = model.native_size if settings.width is None else settings.width
        model.check_size(height, width)
        return Canvas(height, width, None, _as_images)
    if image is None:
        raise ValueError(f"{mode} needs an image")
    strength = settings.resolved_strength(model.is_inpainting)
    if mode in ("img2img", "upscale"):
        image = editing.load_image(image, "init image" if mode == "img2img" else "image")
        if mode == "upscale":
            f = model.factor
            width, height = (max(f, int(round(side * settings.scale / f)) * f) for side in image.size)
        else:
            width, height = _img2img_size(image, settings, model.factor)
        model.check_size(height, width)
        if (width, height) != image.size:
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        init = model.encode(editing.to_model_range(np.asarray(image)), settings.tile)
        return Canvas(height, width, Start(init=init, strength=strength), _as_images)

    image = editing.load_image(image, "image")
    if mode == "outpaint":
        editing.check_multiple(*image.size, model.factor, what="the image to outpaint")
        margins = (settings.left, settings.right, settings.top, settings.bottom)
        canvas, _, alpha = editing.extend_canvas(
            np.asarray(image), *margins, seam=settings.seam, rng=np.random.default_rng(settings.seed)
        )
        return _inpaint(canvas, alpha, dataclasses.replace(settings, fill="original"), strength, model)
    if mask is None:
        raise ValueError("inpaint needs a mask")
    alpha = editing.blur_mask(editing.load_mask(mask, image.size), settings.mask_blur)
    return _inpaint(np.asarray(image), alpha, settings, strength, model)


def _img2img_size(image: Image.Image, settings: GenerationSettings, factor: int) -> tuple[int, int]:
    """img2img's (width, height): the settings', else the image's own rounded down to multiples of the factor."""
    if settings.height is not None and settings.width is not None:
        return settings.width, settings.height
    if settings.height is not None or settings.width is not None:
        raise ValueError("give both height and width, or neither (the image's own size)")
    width, height = editing.round_size(*image.size, factor)
    if (width, height) != image.size:
        log.warning(
            "init image %dx%d is resized to %dx%d: sizes must be multiples of %d", *image.size, width, height, factor
        )
    return width, height


def _inpaint(
    image: np.ndarray, alpha: np.ndarray, settings: GenerationSettings, strength: float, model: EditModel
) -> Canvas:
    """Inpainting of `image` (H, W, 3) uint8 where the soft mask `alpha` (H, W) is set; the result is pasted back.

    The whole image is padded to multiples of the latent factor by edge replication (the padding is known: mask 0);
    with only_masked, the mask's box plus `padding` is cut out and resized to the processing size.
    """
    if not (alpha >= 0.5).any():  # e.g. a mask of a few pixels, blurred below one half
        raise ValueError(editing.EMPTY_MASK)
    f = model.factor
    only_masked = settings.mode == "inpaint" and settings.only_masked
    if only_masked:
        width = model.native_size if settings.width is None else settings.width
        height = model.native_size if settings.height is None else settings.height
        model.check_size(height, width)
        region = editing.crop_region(alpha, settings.padding, width, height)
        x0, y0, x1, y1 = region
        crop = Image.fromarray(image[y0:y1, x0:x1]).resize((width, height), Image.Resampling.LANCZOS)
        crop_alpha = Image.fromarray(alpha[y0:y1, x0:x1].astype(np.float32), mode="F")
        work_image = np.asarray(crop)
        work_alpha = np.clip(np.asarray(crop_alpha.resize((width, height), Image.Resampling.BILINEAR)), 0, 1)

        def finish(pixels):
            return [Image.fromarray(editing.paste_crop(image, piece, region, alpha)) for piece in pixels]
    else:
        h, w = alpha.shape
        work_image = np.pad(image, ((0, -h % f), (0, -w % f), (0, 0)), mode="edge")
        work_alpha = np.pad(alpha, ((0, -h % f), (0, -w % f)))

        def finish(pixels):
            return [Image.fromarray(editing.paste_back(image, g[:h, :w], alpha)) for g in pixels]

    height, width = work_alpha.shape
    fill = settings.fill
    work_image = editing.fill_masked(work_image, work_alpha, fill, np.random.default_rng(settings.seed))
    concat = model.is_inpainting
    latent_mask = editing.latent_mask(work_alpha, f, binary=concat)
    if not concat:
        latent_mask = np.round(latent_mask)  # a soft edge is the pixel paste-back's job
    masked = model.encode(editing.masked_image(work_image, work_alpha), None) if concat else None
    start = Start(
        init=model.encode(editing.to_model_range(work_image), None),
        strength=strength,
        mask=latent_mask[..., None].astype(np.float32),
        masked=masked,
        fill=fill,
    )
    return Canvas(height, width, start, finish)


def start_inputs(start: Start, fill_keys: jax.Array, n: int) -> dict[str, np.ndarray]:
    """The per-image arrays (n, h, w, .) of an editing request: image latents, mask, masked latents."""
    init = np.broadcast_to(start.init, (n,) + start.init.shape)
    if start.mask is not None and start.fill in ("latent_noise", "latent_nothing"):
        init = init * (1.0 - start.mask)
        if start.fill == "latent_noise":
            noise = np.asarray(generation.unit_noise(fill_keys, (start.init.shape[2],) + start.init.shape[:2]))
            init = init + np.transpose(noise, (0, 2, 3, 1)) * start.mask
    inputs = {"init": np.ascontiguousarray(init, np.float32)}
    for name in ("mask", "masked"):
        value = getattr(start, name)
        if value is not None:
            inputs[name] = np.broadcast_to(value, (n,) + value.shape).astype(np.float32)
    return inputs
