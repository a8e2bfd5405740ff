"""Host-side image and mask preparation for img2img, inpainting and outpainting (numpy and PIL, no JAX).

Layouts: images are uint8 RGB arrays (H, W, 3) or PIL images; masks and alphas are float32 (H, W) in [0, 1]
where 1 (white) marks the area to repaint; sizes given as pairs are (width, height), as PIL gives them.
Every function is pure: inputs are never modified, randomness comes from an explicit `np.random.Generator`.
User mistakes raise a one-line ValueError naming the problem and the values; a missing file FileNotFoundError.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

FILLS = ("original", "fill", "noise", "latent_noise", "latent_nothing")
# "fill": the repainted area starts from the colours around it, smoothed at falling radii (pixels, and passes of each).
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))
EMPTY_MASK = "the mask is empty: nothing to repaint (white marks the area to repaint)"
OUTPAINT_NOISE_STD = 40.0  # pixel levels of Gaussian noise over the edge-stretched new area of an outpaint canvas
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _open_image(path: str | os.PathLike, what: str) -> Image.Image:
    """Opens and fully decodes an image file, in whatever mode the file stores."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a directory, not an image file")
    try:
        with Image.open(path) as image:
            image.load()  # decoding here turns a truncated file into an error now, not in a later step
            return image.copy()
    except PermissionError:
        raise
    except Image.UnidentifiedImageError:
        raise ValueError(f"{what}: {path} is not an image file") from None
    except OSError as e:  # a truncated or corrupt file of a known format
        raise ValueError(f"{what}: {path} is not an image file ({e})") from None


def _from_sixteen_bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale (modes I;16*, and I as older Pillow opens 16-bit PNGs) to 8-bit L by scaling, not clipping."""
    values = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))


def load_image(image: Image.Image | str | os.PathLike, what: str = "image") -> Image.Image:
    """An RGB PIL image from a PIL image or an image file (an RGB PIL image is returned as it is).

    Transparent images (RGBA, LA, PA, or P with a transparent colour) are composited on black, so the colour
    hidden under fully transparent pixels never shows. 16-bit grayscale is scaled to 8 bits (x / 257);
    every other mode goes through PIL's own conversion.

    Args:
        image: a PIL image, or the path of an image file.
        what: what the image is for, used in error messages ("image", "init image", ...).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the path is a directory, or a file PIL cannot read (not an image, or truncated).
    """
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(image, what)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"{what} must be a PIL image or a path, not {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return _from_sixteen_bit(image).convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _rgb_array(image: Image.Image | np.ndarray, what: str) -> np.ndarray:
    """A uint8 (H, W, 3) array from a PIL image (any mode, see load_image) or such an array."""
    if isinstance(image, Image.Image):
        return np.asarray(load_image(image, what))
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{what} must be a uint8 (H, W, 3) RGB array; got {image.dtype} of shape {image.shape}")
    return image


def _float_mask(mask: np.ndarray, what: str = "mask") -> np.ndarray:
    """A float32 (H, W) copy of a mask array, checked to be 2-D, finite and within [0, 1]."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (H, W) array; got shape {mask.shape}")
    if mask.dtype == np.uint8:
        return mask.astype(np.float32) / np.float32(255)
    mask = mask.astype(np.float32)
    if mask.size and not (np.isfinite(mask).all() and mask.min() >= 0 and mask.max() <= 1):
        raise ValueError(f"{what} values must lie in [0, 1]; got min {mask.min()} and max {mask.max()}")
    return mask


def _check_mask_size(mask: np.ndarray, width: int, height: int, what: str = "mask") -> None:
    mask_height, mask_width = mask.shape[:2]
    if (mask_width, mask_height) != (width, height):
        raise ValueError(f"{what} is {mask_width}x{mask_height} but the image is {width}x{height} (width x height)")


def load_mask(mask: Image.Image | str | os.PathLike | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float32 (H, W) mask in [0, 1] (1 = repaint) from a PIL image, an image file or an array.

    Images are reduced to their luminance (PIL's convert("L"), which ignores alpha; 16-bit grayscale is scaled).
    Arrays may be (H, W) or (H, W, 1) of bool, uint8 (0..255) or float in [0, 1], or uint8 (H, W, 3|4) RGB(A).

    Args:
        mask: the mask.
        size: the image's (width, height), which the mask must match.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: not an image, a size other than `size`, values outside [0, 1], or no pixel >= 0.5.
    """
    if isinstance(mask, (str, os.PathLike)):
        mask = _open_image(mask, "mask")
    if isinstance(mask, Image.Image):
        gray = _from_sixteen_bit(mask) if mask.mode in _SIXTEEN_BIT_MODES else mask.convert("L")
        values = np.asarray(gray).astype(np.float32) / np.float32(255)
    else:
        values = np.asarray(mask)
        if values.ndim == 3 and values.shape[-1] == 1:
            values = values[..., 0]
        elif values.ndim == 3 and values.shape[-1] in (3, 4) and values.dtype == np.uint8:
            values = np.asarray(Image.fromarray(values).convert("L"))
        values = _float_mask(values.astype(np.float32) if values.dtype == bool else values)
    _check_mask_size(values, *size)
    if not (values >= 0.5).any():
        raise ValueError(EMPTY_MASK)
    return values


# ---------------------------------------------------------------------------------------------------------------
# Sizes


def round_size(width: int, height: int, multiple: int = 8) -> tuple[int, int]:
    """(width, height) each rounded down to a multiple of `multiple`, and at least `multiple`."""
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1; got {multiple}")
    if width < 1 or height < 1:
        raise ValueError(f"the size must be positive; got {width}x{height} (width x height)")
    return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)


def check_multiple(width: int, height: int, multiple: int = 8, what: str = "image") -> None:
    """Raises a ValueError naming the side(s) of a `what` that are not a multiple of `multiple`."""
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1; got {multiple}")
    bad = [f"{name} {value}" for name, value in (("width", width), ("height", height)) if value % multiple]
    if bad:
        rounded = "x".join(map(str, round_size(width, height, multiple)))
        sides = " and ".join(bad) + (" are not multiples" if len(bad) == 2 else " is not a multiple")
        raise ValueError(
            f"{what} is {width}x{height} (width x height): {sides} of {multiple} (rounding down gives {rounded})"
        )


# ---------------------------------------------------------------------------------------------------------------
# Masks


def _gaussian_kernel(sigma: float) -> np.ndarray:
    """A normalised 1-D Gaussian (2K + 1,) float64, K = min(ceil(3 sigma), floor((3 sigma + 2) / sqrt 2)).

    The second bound keeps the corners of the separable kernel's square support within 3 sigma + 2 of its
    centre, so a blurred mask is exactly 0 wherever no masked pixel lies within that (Euclidean) distance.
    """
    half = max(1, min(math.ceil(3 * sigma), math.floor((3 * sigma + 2) / math.sqrt(2))))
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def _convolve_rows(values: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Same-size convolution of (H, W) along H with a symmetric kernel, the border rows replicated outward."""
    half = len(kernel) // 2
    padded = np.pad(values, ((half, half), (0, 0)), mode="edge")
    out = np.zeros_like(values)
    for k, weight in enumerate(kernel):
        out += weight * padded[k : k + len(values)]
    return out


def blur_mask(mask: np.ndarray, radius: float) -> np.ndarray:
    """A Gaussian blur of a mask (the soft edge of "mask blur"), float32 (H, W) in [0, 1].

    `radius` is the standard deviation in pixels, as in PIL's ImageFilter.GaussianBlur. The separable kernel is
    truncated at about 2.1 to 3 radii (see _gaussian_kernel), so every pixel further than 3 * radius + 2 from
    all nonzero mask pixels stays exactly 0 and pasting back never touches it. Image borders are replicated
    outward, so a mask touching a border stays 1 there. Radius 0 returns a float32 copy of the mask.
    """
    if not radius >= 0:
        raise ValueError(f"the mask blur radius must be >= 0; got {radius}")
    mask = _float_mask(mask)
    if radius == 0:
        return mask.copy()
    kernel = _gaussian_kernel(radius)
    blurred = _convolve_rows(_convolve_rows(mask.astype(np.float64), kernel).T, kernel).T
    return np.clip(blurred, 0, 1).astype(np.float32)


def latent_mask(mask: np.ndarray, factor: int = 8, *, binary: bool) -> np.ndarray:
    """The mask at latent resolution, float32 (H / factor, W / factor).

    binary=True (9-channel inpainting U-Nets, as diffusers' StableDiffusionInpaintPipeline): binarised at 0.5
    and downsampled by nearest neighbour as torch's interpolate(mode="nearest") does, i.e. mask[::factor, ::factor].
    binary=False (ordinary U-Nets): the mean over each factor x factor block, a soft mask in [0, 1].
    """
    mask = _float_mask(mask)
    height, width = mask.shape
    check_multiple(width, height, factor, what="mask")
    if binary:
        return (mask[::factor, ::factor] >= 0.5).astype(np.float32)
    return mask.reshape(height // factor, factor, width // factor, factor).mean(axis=(1, 3), dtype=np.float32)


def to_model_range(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (H, W, 3) in [-1, 1], as diffusers' VaeImageProcessor: 2 * (x / 255) - 1."""
    values = _rgb_array(image, "image").astype(np.float32) / np.float32(255)
    return np.float32(2) * values - np.float32(1)


def masked_image(image: Image.Image | np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The 9-channel inpainting U-Net's conditioning image, float32 (H, W, 3) in [-1, 1].

    As diffusers builds it: the image in [-1, 1] times (binarised mask < 0.5), i.e. the area to repaint set to 0.
    """
    pixels = to_model_range(image)
    mask = _float_mask(mask)
    _check_mask_size(mask, pixels.shape[1], pixels.shape[0])
    return pixels * (mask < 0.5)[..., None].astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Only-masked inpainting: the crop around the mask


def _fit_span(start: int, stop: int, want: int, limit: int) -> tuple[int, int]:
    """Grows [start, stop) symmetrically to length `want`, shifted to fit in [0, limit), clipped if it cannot."""
    grow = max(0, want - (stop - start))
    start, stop = start - grow // 2, stop + grow - grow // 2
    if stop > limit:
        start, stop = start - (stop - limit), limit
    if start < 0:
        start, stop = 0, stop - start
    return start, min(stop, limit)


def crop_region(mask: np.ndarray, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The region of the image that "only masked" inpainting crops, as (x0, y0, x1, y1), x1 and y1 exclusive.

    The bounding box of mask > 0 (pass the blurred mask), grown by `padding` on each side and clipped to the
    image, then grown symmetrically in one direction to the aspect ratio of the processing size `width` x
    `height` (the resolution the crop is resized to), shifted back inside the image where it meets a border
    (the idea of AUTOMATIC1111's expand_crop_region). It never leaves the image: where the image is too small
    for that aspect ratio, the region spans the whole image in that direction and the ratio is not met.

    Args:
        mask: float (H, W), the (blurred) mask at image size.
        padding: pixels of context added around the mask's bounding box on each side, >= 0.
        width, height: the processing size.
    """
    mask = _float_mask(mask)
    if padding < 0:
        raise ValueError(f"the crop padding must be >= 0; got {padding}")
    if width < 1 or height < 1:
        raise ValueError(f"the processing size must be positive; got {width}x{height} (width x height)")
    image_height, image_width = mask.shape
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if rows.size == 0:
        raise ValueError(EMPTY_MASK)
    x0, x1 = max(0, int(cols[0]) - padding), min(image_width, int(cols[-1]) + 1 + padding)
    y0, y1 = max(0, int(rows[0]) - padding), min(image_height, int(rows[-1]) + 1 + padding)
    if (x1 - x0) * height > (y1 - y0) * width:  # wider than the processing size: grow the height
        y0, y1 = _fit_span(y0, y1, round((x1 - x0) * height / width), image_height)
    else:
        x0, x1 = _fit_span(x0, x1, round((y1 - y0) * width / height), image_width)
    return x0, y0, x1, y1


# ---------------------------------------------------------------------------------------------------------------
# Pasting back


def paste_back(
    original: Image.Image | np.ndarray, generated: Image.Image | np.ndarray, alpha: np.ndarray
) -> np.ndarray:
    """Blends generated over original with a per-pixel alpha, uint8 (H, W, 3).

    Each pixel is round(original + alpha * (generated - original)): exactly the original's bytes where
    alpha == 0 and exactly the generated bytes where alpha == 1.

    Args:
        original, generated: uint8 (H, W, 3) (or PIL images) of the same size.
        alpha: float (H, W) in [0, 1], 1 = generated.
    """
    original, generated = _rgb_array(original, "original image"), _rgb_array(generated, "generated image")
    if original.shape != generated.shape:
        raise ValueError(
            f"the generated image is {generated.shape[1]}x{generated.shape[0]} but the original is "
            f"{original.shape[1]}x{original.shape[0]} (width x height)"
        )
    alpha = _float_mask(alpha, "alpha")
    _check_mask_size(alpha, original.shape[1], original.shape[0], what="alpha")
    low = original.astype(np.float32)
    blended = low + alpha[..., None] * (generated.astype(np.float32) - low)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def paste_crop(
    original: Image.Image | np.ndarray,
    generated_crop: Image.Image | np.ndarray,
    region: tuple[int, int, int, int],
    alpha_full: np.ndarray,
) -> np.ndarray:
    """Pastes a generated crop (of the processing size) back into the full image, uint8 (H, W, 3).

    The crop is resized (Lanczos) to the region's size and blended in with `alpha_full` (float (H, W), at
    image size) restricted to the region, so that no pixel outside the region changes.

    Args:
        original: uint8 (H, W, 3) or a PIL image, the full image.
        generated_crop: uint8 (h, w, 3) or a PIL image, any size.
        region: (x0, y0, x1, y1) from crop_region, x1 and y1 exclusive.
        alpha_full: float (H, W) in [0, 1], the paste-back alpha of the full image.
    """
    original = _rgb_array(original, "original image")
    image_height, image_width = original.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in region)
    if not (0 <= x0 < x1 <= image_width and 0 <= y0 < y1 <= image_height):
        raise ValueError(f"region {region} is not a non-empty box inside the {image_width}x{image_height} image")
    if isinstance(generated_crop, Image.Image):
        crop = load_image(generated_crop, "generated crop")
    else:
        crop = Image.fromarray(_rgb_array(generated_crop, "generated crop"))
    crop = crop.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS)
    alpha_full = _float_mask(alpha_full, "alpha")
    _check_mask_size(alpha_full, image_width, image_height, what="alpha")
    generated = original.copy()
    generated[y0:y1, x0:x1] = np.asarray(crop)
    alpha = np.zeros_like(alpha_full)
    alpha[y0:y1, x0:x1] = alpha_full[y0:y1, x0:x1]
    return paste_back(original, generated, alpha)


# ---------------------------------------------------------------------------------------------------------------
# Starting content


def check_fill(fill: str) -> None:
    """Raises a one-line ValueError unless `fill` is one of FILLS."""
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}; choose one of {', '.join(FILLS)}")


def fill_masked(image: Image.Image | np.ndarray, mask: np.ndarray, fill: str, rng: np.random.Generator) -> np.ndarray:
    """The pixels the sampler starts from inside the mask, uint8 (H, W, 3).

    "original" keeps the image; "fill" paints the area with the colours around it (`surrounding_colours`);
    "noise" blends uniform random pixels in by the mask (pixels where the mask is 0 keep their bytes);
    "latent_noise" and "latent_nothing" fill in latent space (the pipeline's job), so the image is returned
    unchanged.
    """
    check_fill(fill)
    image = _rgb_array(image, "image")
    mask = _float_mask(mask)
    _check_mask_size(mask, image.shape[1], image.shape[0])
    if fill == "fill":
        return surrounding_colours(image, mask)
    if fill != "noise":
        return image.copy()
    noise = rng.integers(0, 256, size=image.shape, dtype=np.uint8)
    return paste_back(image, noise, mask)


def _gaussian_blur_fft(values: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur (standard deviation `sigma` pixels) of (H, W, C) float64, zero outside the image."""
    height, width = values.shape[:2]
    pad = int(math.ceil(3 * sigma))
    shape = (height + 2 * pad, width + 2 * pad)
    freq_y = np.fft.fftfreq(shape[0])[:, None]
    freq_x = np.fft.rfftfreq(shape[1])[None, :]
    # The Fourier transform of a unit-sum Gaussian: no kernel of up to 6 sigma taps per pixel.
    response = np.exp(-2 * (math.pi * sigma) ** 2 * (freq_y**2 + freq_x**2))
    padded = np.zeros(shape + values.shape[2:])
    padded[pad : pad + height, pad : pad + width] = values
    blurred = np.fft.irfft2(np.fft.rfft2(padded, axes=(0, 1)) * response[..., None], s=shape, axes=(0, 1))
    return blurred[pad : pad + height, pad : pad + width]


def surrounding_colours(image: Image.Image | np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The masked area painted with the colours around it, uint8 (H, W, 3) (AUTOMATIC1111's "fill").

    At each radius of FILL_PASSES the known pixels (weight 1 - mask) are blurred and divided by their blurred
    weight, a normalised convolution: every pixel gets the mean colour of the known pixels near it, opaque as far as
    the known pixels' weight reaches. The layers are laid over one another, widest first, as many times as the
    pass says; the last (radius 0) puts the known pixels back exactly where the mask is 0.
    """
    image = _rgb_array(image, "image").astype(np.float64)
    known = 1.0 - _float_mask(mask).astype(np.float64)
    _check_mask_size(known, image.shape[1], image.shape[0])
    colour = np.zeros_like(image)
    coverage = np.zeros(known.shape + (1,))
    layer = np.concatenate([image * known[..., None], known[..., None]], axis=-1)
    for radius, passes in FILL_PASSES:
        blurred = _gaussian_blur_fft(layer, radius) if radius else layer
        alpha = np.clip(blurred[..., 3:], 0.0, 1.0)
        straight = blurred[..., :3] / np.maximum(blurred[..., 3:], 1e-12)
        for _ in range(passes):  # "over": the new layer in front of what is there
            total = alpha + coverage * (1.0 - alpha)
            colour = np.where(
                total > 0, (straight * alpha + colour * coverage * (1.0 - alpha)) / np.maximum(total, 1e-12), 0.0
            )
            coverage = total
    return np.clip(np.rint(colour), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Outpainting


def _seam_ramp(size: int, seam: int) -> np.ndarray:
    """float32 (size,): 1 - (d + 0.5) / seam at distance d (pixels) from the border, clipped at 0."""
    if seam == 0:
        return np.zeros(size, np.float32)
    distance = np.arange(size, dtype=np.float64) + 0.5
    return np.clip(1 - distance / seam, 0, 1).astype(np.float32)


def extend_canvas(
    image: Image.Image | np.ndarray,
    left: int,
    right: int,
    top: int,
    bottom: int,
    *,
    multiple: int = 8,
    seam: int = 8,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An outpainting canvas: the image with new area on its sides, and what to repaint.

    The new area is the image's border pixels stretched outward plus Gaussian noise (OUTPAINT_NOISE_STD levels),
    a start the sampler can change. The mask is 1 on the new area and ramps down over `seam` pixels into the
    original on each extended side (1 - (d + 0.5) / seam at pixel distance d from the border, the maximum where
    two sides meet), so original pixels `seam` or more pixels inside stay exactly as they were after paste_back.

    Args:
        image: uint8 (H, W, 3) or a PIL image, sides multiples of `multiple`.
        left, right, top, bottom: pixels to add on each side, non-negative multiples of `multiple`.
        multiple: the size the VAE needs sides to be multiples of.
        seam: width in pixels of the soft blend into the original, >= 0.
        rng: the source of the noise.

    Returns:
        canvas: uint8 (H + top + bottom, W + left + right, 3), the original pixels unchanged in place.
        mask: float32 (H', W') in [0, 1], what the sampler repaints.
        alpha: float32 (H', W'), the paste-back alpha (equal to the mask).
    """
    image = _rgb_array(image, "image")
    height, width = image.shape[:2]
    check_multiple(width, height, multiple, what="image")
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in sides.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name}={value!r} must be a whole number of pixels")
        if value < 0:
            raise ValueError(f"{name}={value} must not be negative")
        if value % multiple:
            raise ValueError(f"{name}={value} is not a multiple of {multiple}")
    if not any(sides.values()):
        raise ValueError("nothing to outpaint: give left, right, top or bottom")
    if isinstance(seam, bool) or not isinstance(seam, (int, np.integer)) or seam < 0:
        raise ValueError(f"seam={seam!r} must be a whole number of pixels >= 0")

    pad = ((top, bottom), (left, right))
    new_area = np.pad(np.zeros((height, width), bool), pad, constant_values=True)
    stretched = np.pad(image, (*pad, (0, 0)), mode="edge").astype(np.float32)
    noise = rng.normal(0.0, OUTPAINT_NOISE_STD, size=stretched.shape).astype(np.float32)
    noisy = np.clip(np.rint(stretched + noise), 0, 255).astype(np.uint8)
    canvas = np.pad(image, (*pad, (0, 0)))
    canvas[new_area] = noisy[new_area]

    ramp_x, ramp_y = _seam_ramp(width, seam), _seam_ramp(height, seam)
    inner = np.zeros((height, width), np.float32)
    if left:
        inner = np.maximum(inner, ramp_x[None, :])
    if right:
        inner = np.maximum(inner, ramp_x[None, ::-1])
    if top:
        inner = np.maximum(inner, ramp_y[:, None])
    if bottom:
        inner = np.maximum(inner, ramp_y[::-1, None])
    mask = np.pad(inner, pad, constant_values=1.0)
    return canvas, mask, mask.copy()
