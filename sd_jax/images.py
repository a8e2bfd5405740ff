"""Images in and out: writing PNGs without ever overwriting or leaving a half-written file."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

_NUMBERED = re.compile(r"^(\d+)-")


def _next_number(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def save_pngs(images: Sequence[Image.Image], folder: str | os.PathLike, seeds: Sequence[int]) -> list[Path]:
    """Saves images as `<number>-<seed>.png` in `folder`, numbering on from the files already there.

    Each file is written under a temporary name and hard-linked to its final name, which fails rather than
    replaces when that name exists (another process got there first): then the next number is tried.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    number = _next_number(folder)
    for image, seed in zip(images, seeds, strict=True):
        fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".png", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                image.save(f, format="PNG")
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
