"""The synthetic "shapes" data the default model learns, and a deterministic evaluator that reads it back.

Each image is one filled circle, square or triangle of one colour on a plain background of another, captioned
`a {colour} {shape} on a {background} background` (90 captions, 6 of them held out of training to test
composition). `evaluate` reads (colour, shape, background) back from pixels with plain numpy geometry, no learned
model, so generated images can be scored against their prompts:

    images = [render("red", "circle", "blue", 64, np.random.default_rng(i)) for i in range(8)]
    score(images, [caption("red", "circle", "blue")] * 8)  # {'colour': 1.0, 'shape': 1.0, ...}
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "white", "black")

# RGB values at least ~180 apart from each other (Euclidean), so blur, noise and a generator's colour drift
# do not move a colour to a neighbour's; yellow and white differ by 220 in blue, green and black by 185 in green.
RGB = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}

_TEMPLATE = "a {} {} on a {} background"


def caption(colour: str, shape: str, background: str) -> str:
    """`a {colour} {shape} on a {background} background`; raises ValueError on unknown names or same colours."""
    _check(colour, shape, background)
    return _TEMPLATE.format(colour, shape, background)


def parse_caption(text: str) -> tuple[str, str, str]:
    """(colour, shape, background) of a caption made by `caption`; ValueError for any other text."""
    words = text.split(" ")
    if len(words) != 7 or " ".join(words) != _TEMPLATE.format(words[1], words[2], words[5]):
        raise ValueError(f"not a shapes caption: {text!r} (expected {_TEMPLATE.format('COLOUR', 'SHAPE', 'COLOUR')!r})")
    colour, shape, background = words[1], words[2], words[5]
    _check(colour, shape, background)
    return colour, shape, background


def _check(colour: str, shape: str, background: str) -> None:
    for name, allowed in ((colour, COLOURS), (shape, SHAPES), (background, COLOURS)):
        if name not in allowed:
            raise ValueError(f"unknown {'shape' if allowed is SHAPES else 'colour'} {name!r}; known: {allowed}")
    if colour == background:
        raise ValueError(f"the shape and the background are both {colour}")


ALL_CAPTIONS = tuple(
    caption(c, s, b) for s, c, b in itertools.product(SHAPES, COLOURS, COLOURS) if c != b
)  # 3 x 6 x 5 = 90
# Every colour, shape and background appears in training; these combinations never do.
HELD_OUT = (
    "a red triangle on a white background",
    "a green circle on a black background",
    "a blue square on a yellow background",
    "a yellow triangle on a blue background",
    "a white circle on a red background",
    "a black square on a green background",
)
TRAIN_CAPTIONS = tuple(c for c in ALL_CAPTIONS if c not in HELD_OUT)  # 84

_SUPERSAMPLE = 4  # edges antialiased by drawing 4x larger and box-filtering down
_MIN_BOX, _MAX_BOX = 0.3, 0.6  # the shape's bounding box, as a fraction of the side


def render(colour: str, shape: str, background: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One filled shape on a plain background, at a random position and size; a pure function of rng's state.

    The shape's bounding box is a square of side 30-60% of `size`, fully inside the image. A triangle is upright
    and isosceles, filling its box (apex at the top centre, base along the bottom).

    Returns:
      uint8 (size, size, 3): exact RGB[colour] inside, RGB[background] outside, a blend along the edges.
    """
    _check(colour, shape, background)
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    side = int(rng.integers(int(np.ceil(_MIN_BOX * size)), int(_MAX_BOX * size) + 1))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    k = _SUPERSAMPLE
    canvas = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = x0 * k, y0 * k, (x0 + side) * k - 1, (y0 + side) * k - 1
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=255)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=255)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=255)
    coverage = np.asarray(canvas.resize((size, size), Image.BOX), np.float32)[..., None] / 255
    fg, bg = np.array(RGB[colour], np.float32), np.array(RGB[background], np.float32)
    return np.round(bg + (fg - bg) * coverage).astype(np.uint8)


def write_dataset(
    folder: str | os.PathLike,
    captions: Sequence[str],
    per_caption: int,
    size: int,
    seed: int,
    *,
    progress: bool = True,
) -> int:
    """Writes `per_caption` images of each caption as `NNNNNN.png` with its caption in `NNNNNN.txt`.

    Image i shows captions[i % len(captions)] (so every prefix is balanced) drawn with the generator seeded by
    (seed, i): the same call always writes the same files. Each file is written under a temporary name and renamed,
    the PNG before its caption, so a pair whose caption exists is complete; a rerun skips those pairs (and
    resumes a killed run). A caption file that disagrees with `captions` raises ValueError: another dataset.

    Returns:
      The number of pairs written (0 when the folder was already complete).
    """
    from tqdm import tqdm

    if per_caption < 1:
        raise ValueError(f"per_caption must be at least 1, got {per_caption}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not captions:
        raise ValueError("no captions to draw")
    parsed = [parse_caption(c) for c in captions]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    total = len(captions) * per_caption
    for i in tqdm(range(total), desc="shapes", unit="image", file=sys.stderr, disable=not progress):
        text = captions[i % len(captions)]
        png, txt = folder / f"{i:06d}.png", folder / f"{i:06d}.txt"
        if txt.exists():
            if txt.read_text() != text:
                raise ValueError(f"{txt} holds {txt.read_text()!r}, not {text!r}: {folder} is another dataset")
            if png.exists():
                continue
        pixels = render(*parsed[i % len(captions)], size, np.random.default_rng([seed, i]))
        _write_atomic(png, lambda f, p=pixels: Image.fromarray(p).save(f, format="PNG"))
        _write_atomic(txt, lambda f, t=text: f.write(t.encode()))
        written += 1
    return written


def _write_atomic(path: Path, write) -> None:
    # The temporary name ends in .tmp so that a glob for *.png never sees a half-written image.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- evaluation ----

_PALETTE = np.array([RGB[c] for c in COLOURS], np.float32)  # (6, 3)
_ANALYSIS_SIDE = 128  # larger images are box-filtered down to this first: the geometry needs no more
_MIN_CONTRAST = 60.0  # RGB distance from the background beyond which a pixel may belong to the shape
_MIN_AREA = 0.005  # a shape smaller than this fraction of the image counts as none


def evaluate(image: np.ndarray | Image.Image) -> tuple[str | None, str | None, str]:
    """Reads (colour, shape, background) from an image of one shape on a plain background.

    Background: the most common nearest named colour among the border pixels. Shape mask: the pixels nearer the
    shape's colour than the background's (the largest connected part, holes filled); its colour is the nearest named
    colour to the median of the mask's core. Its class is the ideal shape that overlaps it best once matched to its
    moments (`shape_features`), which stays right for blurred, noisy and slightly misdrawn shapes.

    Args:
      image: uint8 (H, W, 3) array or RGB PIL image, H and W >= 32.

    Returns:
      (colour, shape, background); colour and shape are None when no shape stands out of the background.
    """
    pixels = _analysis_pixels(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    border_names = _nearest(border)
    bg_index = int(np.bincount(border_names, minlength=len(COLOURS)).argmax())
    bg_rgb = np.median(border[border_names == bg_index], axis=0)
    background = COLOURS[bg_index]

    min_area = max(4, _MIN_AREA * pixels.shape[0] * pixels.shape[1])
    candidates = np.linalg.norm(pixels - bg_rgb, axis=-1) > _MIN_CONTRAST
    if candidates.sum() < min_area:
        return None, None, background
    # Each pixel's position on the line from the background colour to the shape's: > 1/2 means mostly shape,
    # which puts a blurred edge where the sharp one was.
    axis = np.median(pixels[candidates], axis=0) - bg_rgb
    along = (pixels - bg_rgb) @ axis / max(float(axis @ axis), 1e-6)
    mask = _fill_holes(_largest_component(along > 0.5))
    if mask.sum() < min_area:
        return None, None, background
    # The shape's colour from its core (the more shape-like half of the mask), not its blurred rim, whose blends
    # can sit nearer a third colour (black blurred into white is grey, nearer green than either).
    core = mask & (along >= np.median(along[mask]))
    colour = COLOURS[int(_nearest(np.median(pixels[core], axis=0)[None])[0])]
    return colour, _classify(mask), background


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """How well a boolean (H, W) shape mask matches each shape: the IoU with an ideal one of the same moments.

    Each ideal shape is placed and sized from the mask's centroid and standard deviations along x and y (a square
    of side s has deviation s / sqrt(12), a disc of diameter d has d / 4, an upright triangle of height h and base b
    has h / sqrt(18) and b / sqrt(24), its centroid two thirds of the way down). Moments use every pixel, so a few
    stray or missing edge pixels, blurred corners or a slightly stretched shape barely move them, where a bounding
    box or a fill ratio would jump.

    Returns:
      {shape: intersection over union of the mask and that ideal shape}, for each of SHAPES.
    """
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    # A pixel is a unit square, not a point: its own variance (1/12) is not the shape's.
    sy, sx = (np.sqrt(max(v.var() - 1 / 12, 1e-3)) for v in (ys, xs))
    y, x = np.mgrid[: mask.shape[0], : mask.shape[1]]
    dy, dx = y - cy, x - cx
    height, base = np.sqrt(18) * sy, np.sqrt(24) * sx
    depth = dy + 2 * height / 3  # distance below the triangle's apex
    ideal = {
        "circle": (dx / (2 * sx)) ** 2 + (dy / (2 * sy)) ** 2 <= 1,
        "square": (np.abs(dx) <= np.sqrt(3) * sx) & (np.abs(dy) <= np.sqrt(3) * sy),
        "triangle": (depth >= 0) & (depth <= height) & (np.abs(dx) <= base / 2 * depth / height),
    }
    return {name: float((mask & ideal[name]).sum() / (mask | ideal[name]).sum()) for name in SHAPES}


def _classify(mask: np.ndarray) -> str:
    features = shape_features(mask)
    return max(features, key=features.get)


def score(images: Sequence[np.ndarray | Image.Image], captions: Sequence[str]) -> dict[str, float | int]:
    """Accuracy of `evaluate` against the captions: per attribute and all three at once.

    Returns:
      {"colour", "shape", "background", "all"}: fractions in [0, 1]; "count": the number of images.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    if not captions:
        raise ValueError("no images to score")
    hits = np.array(
        [
            [a == b for a, b in zip(evaluate(im), parse_caption(c), strict=True)]
            for im, c in zip(images, captions, strict=True)
        ]
    )
    colour, shape, background = hits.mean(0)
    return {
        "colour": float(colour),
        "shape": float(shape),
        "background": float(background),
        "all": float(hits.all(1).mean()),
        "count": len(captions),
    }


def _analysis_pixels(image: np.ndarray | Image.Image) -> np.ndarray:
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    if min(height, width) < 32:
        raise ValueError(f"the image must be at least 32 pixels a side, got {height}x{width}")
    scale = _ANALYSIS_SIDE / max(height, width)
    if scale < 1:
        size = (max(32, round(width * scale)), max(32, round(height * scale)))
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.BOX))
    return pixels.astype(np.float32)


def _nearest(rgb: np.ndarray) -> np.ndarray:
    """Index into COLOURS of the nearest named colour of each (N, 3) RGB value."""
    return np.linalg.norm(rgb[:, None, :] - _PALETTE[None], axis=-1).argmin(1)


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a boolean (H, W) mask: a pixel index per component, H * W off the mask."""
    outside = mask.size
    labels = np.where(mask, np.arange(mask.size, dtype=np.int32).reshape(mask.shape), outside).astype(np.int32)
    while True:
        lowest = labels.copy()
        np.minimum(lowest[1:], labels[:-1], out=lowest[1:])
        np.minimum(lowest[:-1], labels[1:], out=lowest[:-1])
        np.minimum(lowest[:, 1:], labels[:, :-1], out=lowest[:, 1:])
        np.minimum(lowest[:, :-1], labels[:, 1:], out=lowest[:, :-1])
        lowest[~mask] = outside
        # Pointer jumping: take the label of the pixel one's label names, so long shapes converge in few steps.
        flat = np.empty(mask.size + 1, np.int32)
        flat[:-1], flat[-1] = lowest.ravel(), outside
        lowest = flat[lowest]
        if np.array_equal(lowest, labels):
            return labels
        labels = lowest


def _box(mask: np.ndarray, pad: int) -> tuple[slice, slice]:
    """The slices of the mask's bounding box grown by `pad` pixels (the caller pads the array to match)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return slice(rows[0], rows[-1] + 1 + 2 * pad), slice(cols[0], cols[-1] + 1 + 2 * pad)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    box = _box(mask, 0)
    labels = _components(mask[box])
    out = np.zeros_like(mask)
    out[box] = labels == np.bincount(labels[mask[box]]).argmax()
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every part of its outside that cannot reach the image border added to it."""
    if not mask.any():
        return mask
    # Within the bounding box grown by one pixel, whatever is outside the mask and reaches the ring reaches the
    # image border too.
    padded = np.pad(mask, 1)
    box = _box(mask, 1)
    crop = padded[box]
    labels = _components(~crop)
    out = padded.copy()
    out[box] = crop | (labels != labels[0, 0])
    return out[1:-1, 1:-1]


def score_model(pipe, captions: Sequence[str], seeds: Sequence[int], **txt2img) -> dict[str, float | int]:
    """`score` of a model's txt2img images: one image per caption and seed (seed s of every caption).

    txt2img: the generation settings (e.g. steps=20); the size defaults to 64x64, the shapes data's.
    """
    txt2img = {"height": 64, "width": 64} | txt2img
    images, labels = [], []
    for seed in seeds:
        images += pipe.txt2img(list(captions), seed=seed, **txt2img)
        labels += list(captions)
    return score([np.asarray(im.convert("RGB")) for im in images], labels)
