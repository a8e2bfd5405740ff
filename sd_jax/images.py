"""Images in and out: PNGs with text chunks and a watermark, never overwritten or left half-written; their texts."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

_NUMBERED = re.compile(r"^(\d+)-")


def _next_number(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def png_info(texts: Mapping[str, str]) -> PngImagePlugin.PngInfo:
    """PNG text chunks: tEXt where the value is Latin-1 (what PNG's tEXt allows), iTXt (UTF-8) otherwise."""
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)  # falls back to add_itxt for text Latin-1 cannot encode
    return info


def save_pngs(
    images: Sequence[Image.Image],
    folder: str | os.PathLike,
    seeds: Sequence[int],
    *,
    texts: Sequence[Mapping[str, str]] | None = None,
    watermark: bytes | None = None,
) -> list[Path]:
    """Saves images as `<number>-<seed>.png` in `folder`, numbering on from the files already there.

    Each file is written under a temporary name and hard-linked to its final name, which fails rather than
    replaces when that name exists (another process got there first): then the next number is tried.

    Args:
      texts: PNG text chunks for each image (e.g. AUTOMATIC1111's `parameters` and sd_jax's settings).
      watermark: a payload to embed as the invisible DWT-DCT watermark (`sd_jax.watermark`); images too small
        to carry one (`watermark_fits`) are saved without it.
    """
    folder = Path(folder)
    images = list(images)
    if texts is not None and len(texts) != len(images):
        raise ValueError(f"{len(texts)} sets of PNG texts for {len(images)} images")
    if watermark is not None:
        from sd_jax.watermark import add_watermark

        images = [add_watermark(image, watermark) for image in images]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    number = _next_number(folder)
    for i, (image, seed) in enumerate(zip(images, seeds, strict=True)):
        info = png_info(texts[i]) if texts is not None else None
        fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".png", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                image.save(f, format="PNG", pnginfo=info)
            while True:
                path = folder / f"{number:05d}-{seed}.png"
                number += 1
                try:
                    os.link(tmp, path)
                    break
                except FileExistsError:
                    continue
        finally:
            os.unlink(tmp)
        paths.append(path)
    return paths


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def save_generated(
    images: Sequence[Image.Image],
    folder: str | os.PathLike,
    seeds: Sequence[int],
    texts: Sequence[Mapping[str, str]] | None = None,
    *,
    family: str,
    watermark: bool = True,
    log: Callable[[str], None] = _to_stderr,
) -> list[Path]:
    """Saves generated images as `save_pngs` does, with their texts and the watermark of their model family.

    Args:
      images: the generated images.
      folder: where the PNGs go (created if missing; existing files are never overwritten).
      seeds: each image's seed, which names its file.
      texts: each image's PNG text chunks (AUTOMATIC1111's `parameters`, sd_jax's JSON settings).
      family: the model's `ModelConfig.family`: "sd1" embeds the SD 1 scripts' payload, "sd2" the SD 2 scripts'.
      watermark: False saves the images unmarked.
      log: told, in one line, when some images are too small to carry the watermark (they are saved without it).

    Returns:
      The paths written, in the order of `images`.
    """
    from sd_jax import watermark as marks

    if family not in marks.PAYLOADS:
        raise ValueError(f"model family must be one of {', '.join(marks.PAYLOADS)}, got {family!r}")
    payload = None
    if watermark:
        payload = marks.PAYLOADS[family]
        if not all(marks.watermark_fits(image) for image in images):
            log(f"note: images under {marks.MIN_SIZE} pixels a side carry no watermark")
    return save_pngs(images, folder, seeds, texts=texts, watermark=payload)


def save_png_as(
    image: Image.Image,
    path: str | os.PathLike,
    texts: Mapping[str, str] | None = None,
    *,
    watermark: bytes | None = None,
    temporary: str | None = None,
) -> Path:
    """Saves one image at exactly `path` (replacing what is there), written under a temporary name in the same
    folder and renamed, so that `path` never holds a partial file: a kill leaves the old file or none.

    Args:
      texts: PNG text chunks; watermark: a payload to embed (`sd_jax.watermark`) when the image can carry one.
      temporary: the temporary file's name (default: a hidden name next to `path`).
    """
    path = Path(path)
    if watermark is not None:
        from sd_jax.watermark import add_watermark, watermark_fits

        if watermark_fits(image):
            image = add_watermark(image, watermark)
    tmp = path.parent / (temporary or f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG", pnginfo=png_info(texts or {}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_png_texts(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of the PNG at `path`.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is not a PNG image (one line).
    """
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise ValueError(f"{path} is not a PNG image")
            return {str(k): str(v) for k, v in image.text.items()}
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not a PNG image") from None
