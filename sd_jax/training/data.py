"""Training data: (image, caption) pairs from a folder, a JSONL or a CSV, in a deterministic, resumable order.

The order is a pure function of the seed: epoch e visits the examples in the permutation drawn from (seed, e), and
the example at global position q (counting from the first step) is fully determined by (seed, q) -- its crop, its
flip, whether its caption is dropped. A run's data position is therefore one integer; resuming from a checkpoint
continues the same sequence, and each host reads only its own slice of every global batch.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from sd_jax.tokenizer import tokenize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_IMAGE_KEYS = ("image", "file_name", "path", "file")
_CAPTION_KEYS = ("caption", "text", "prompt")
# Decoded images are kept in memory when they fit in this much; larger data sets are decoded on the fly.
_MEMORY_CACHE_BYTES = 2 << 30
log = logging.getLogger("sd_jax")


class DataError(ValueError):
    """Training data that cannot be used; the message says why in one line."""


@dataclasses.dataclass(frozen=True)
class Example:
    image: Path
    caption: str


def _pick(row: dict, keys: Sequence[str], what: str, where: str) -> str:
    for k in keys:
        if k in row and row[k] is not None:
            return str(row[k])
    raise DataError(f"{where}: no {what} field (expected one of {', '.join(keys)})")


def read_examples(data: str | Path) -> tuple[list[Example], list[str]]:
    """Lists (image, caption) pairs; returns them and the reasons for the items skipped.

    `data` is a folder (each image with a same-name `.txt` caption; an image without one is skipped and reported),
    a `.jsonl` file (one object a line with `image`/`file_name` and `caption`/`text`) or a `.csv` file with such a
    header. Paths in a file are relative to the file's folder.
    """
    data = Path(data)
    skipped = []
    examples = []
    if data.is_dir():
        images = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise DataError(f"--data {data}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        for image in images:
            caption_file = image.with_suffix(".txt")
            if not caption_file.is_file():
                skipped.append(f"{image.name}: no caption file {caption_file.name}")
                continue
            examples.append(Example(image, caption_file.read_text(encoding="utf-8").strip()))
    elif data.suffix.lower() in (".jsonl", ".csv"):
        rows = []
        if data.suffix.lower() == ".jsonl":
            for n, line in enumerate(data.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{data}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{data}:{n}: expected a JSON object")
                rows.append((f"{data}:{n}", row))
        else:
            with data.open(newline="", encoding="utf-8") as f:
                rows = [(f"{data}:{n}", row) for n, row in enumerate(csv.DictReader(f), 2)]
        for where, row in rows:
            image = data.parent / _pick(row, _IMAGE_KEYS, "image", where)
            caption = _pick(row, _CAPTION_KEYS, "caption", where)
            if not image.is_file():
                skipped.append(f"{where}: {image} does not exist")
                continue
            examples.append(Example(image, caption.strip()))
    else:
        raise DataError(f"--data {data}: expected a folder of images with .txt captions, a .jsonl or a .csv file")
    if not examples:
        raise DataError(f"--data {data}: no usable examples ({len(skipped)} skipped: {skipped[0] if skipped else ''})")
    return examples, skipped


def resize_shorter_side(image: Image.Image, size: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) with the shorter side `size` (Lanczos), aspect ratio kept."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != (w, h):
        image = image.resize(new, Image.Resampling.LANCZOS)
    return np.asarray(image, np.uint8)


def crop(pixels: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """A (size, size) crop: centred when rng is None, else at a random offset."""
    h, w = pixels.shape[:2]
    if rng is None:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return pixels[top : top + size, left : left + size]


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]."""
    return pixels.astype(np.float32) / 127.5 - 1.0


class Dataset:
    """The examples of a run, checked once, then served by global position.

    Args:
      examples: from `read_examples`.
      tokenizer: the model's CLIP tokenizer; captions become (77,) token ids.
      resolution: the square training size.
      center_crop: centre crop (else a random crop per position).
      random_flip: flip horizontally with probability 1/2 per position.
      caption_dropout: probability that a position's caption is replaced by the empty prompt.
      seed: the run's seed; with the position it fixes order, crops, flips and dropped captions.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer,
        *,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
        num_workers: int = 4,
    ):
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.num_workers = num_workers
        self.skipped: list[str] = []
        self.examples, self._pixels = self._scan(list(examples))
        captions = [e.caption for e in self.examples]
        self.input_ids = tokenize(tokenizer, captions) if captions else np.zeros((0, 77), np.int32)
        self.empty_ids = tokenize(tokenizer, [""])[0]
        self._orders: dict[int, np.ndarray] = {}
        self.latents: np.ndarray | None = None  # (N, 2, h, w, 2C) VAE moments of each image and its mirror image

    def _scan(self, examples: list[Example]) -> tuple[list[Example], list[np.ndarray] | None]:
        """Decodes every image once: unreadable ones are skipped and reported before training starts."""
        from tqdm.auto import tqdm

        def decode(example: Example):
            try:
                with Image.open(example.image) as image:
                    return resize_shorter_side(image, self.resolution)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                return f"{example.image.name}: unreadable image ({' '.join(str(e).split())})"

        kept, pixels, total = [], [], 0
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            results = pool.map(decode, examples)
            for example, result in tqdm(
                zip(examples, results, strict=True),
                total=len(examples),
                desc="checking data",
                unit="img",
                leave=False,
                disable=len(examples) < 256,
            ):
                if isinstance(result, str):
                    self.skipped.append(result)
                    continue
                kept.append(example)
                total += result.nbytes
                pixels.append(result if total <= _MEMORY_CACHE_BYTES else None)
        if not kept:
            raise DataError(f"no readable images ({len(self.skipped)} skipped; first: {self.skipped[0]})")
        keep_pixels = total <= _MEMORY_CACHE_BYTES
        return kept, (pixels if keep_pixels else None)

    def __len__(self) -> int:
        return len(self.examples)

    def index(self, position: int) -> int:
        """The example at a global position: epoch = position // N visits a permutation drawn from (seed, epoch)."""
        epoch, offset = divmod(position, len(self))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self))}
        return int(self._orders[epoch][offset])

    def _resized(self, i: int) -> np.ndarray:
        if self._pixels is not None:
            return self._pixels[i]
        with Image.open(self.examples[i].image) as image:
            return resize_shorter_side(image, self.resolution)

    def item(self, position: int) -> dict[str, np.ndarray]:
        """One training example: `pixels` (R, R, 3) in [-1, 1] or `moments` (cached latents), and `input_ids`."""
        i = self.index(position)
        rng = np.random.default_rng([self.seed, 1 << 32, position])
        drop = rng.random() < self.caption_dropout
        flip = self.random_flip and rng.random() < 0.5
        out = {"input_ids": self.empty_ids if drop else self.input_ids[i]}
        if self.latents is not None:
            out["moments"] = self.latents[i, int(flip)]
            return out
        pixels = crop(self._resized(i), self.resolution, None if self.center_crop else rng)
        if flip:
            pixels = pixels[:, ::-1]
        out["pixels"] = to_model_range(pixels)
        return out

    def batch(self, start: int, count: int) -> dict[str, np.ndarray]:
        """Examples at global positions start .. start + count - 1, stacked."""
        items = [self.item(q) for q in range(start, start + count)]
        return {k: np.stack([it[k] for it in items]) for k in items[0]}

    def centered(self, i: int) -> np.ndarray:
        """Example i's centre crop (R, R, 3) in [-1, 1] (for the latent cache)."""
        return to_model_range(crop(self._resized(i), self.resolution, None))
