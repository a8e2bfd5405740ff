"""Textual-inversion embeddings: learned token vectors that a prompt names by a file's name.

AUTOMATIC1111's web UI keeps them in a folder; a file `easynegative.safetensors` defines the word `easynegative`, and
wherever a prompt's tokens spell that word, the file's vectors (one or more, each as wide as the text encoder's
token embeddings) take the place of its tokens. The formats read here:

  - AUTOMATIC1111's `.pt` / `.bin`: a pickled dict whose `string_to_param` holds one tensor {"*": (n, D)};
  - `.safetensors` holding `emb_params` (n, D), as embedding trainers write them (AUTOMATIC1111 reads any one tensor);
  - diffusers' `learned_embeds` (`.bin` or `.safetensors`): one tensor {token: (D,) or (n, D)}.

D is 768 for SD 1.x and 1024 for SD 2.x. Pickles are opened with torch's restricted unpickler: a file that tries to
run code is refused before anything from it runs.

    library = EmbeddingLibrary("embeddings/")
    vocabulary = library.vocabulary(tokenizer, width=768)   # what `sd_jax.prompts.tokenize_prompt` matches
    vocabulary.vectors("easynegative")                       # (n, 768) float32
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from sd_jax.convert.torch_files import CheckpointError, read_safetensors, tensor_to_numpy

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
A1111_KEY = "string_to_param"  # AUTOMATIC1111's .pt: {"string_to_param": {"*": (n, D)}, "name": ..., "step": ...}
SAFETENSORS_KEY = "emb_params"  # the usual .safetensors embedding: {"emb_params": (n, D)}
SHORT_HASH_LENGTH = 12  # hex digits of the file's sha256 in the images' "TI hashes", as AUTOMATIC1111 writes them


class EmbeddingError(ValueError):
    """An embedding file cannot be used: unreadable, unsafe, without vectors, or of another text encoder's width."""


def read_embedding(path: str | os.PathLike) -> np.ndarray:
    """The vectors of one embedding file, (n, D) float32.

    Raises:
      EmbeddingError: a missing, corrupt or unsafe file, a file of several embeddings or none, non-finite values.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise EmbeddingError(f"{path}: not an embedding file (expected one of {', '.join(EMBEDDING_SUFFIXES)})")
    if not path.is_file():
        raise EmbeddingError(f"{path}: no such file")
    try:
        data = _read_safetensors(path) if suffix == ".safetensors" else _read_pickle(path)
    except CheckpointError as e:
        raise EmbeddingError(str(e)) from e
    vectors = _vectors_of(data, path)
    if vectors.ndim == 1:  # diffusers' single-vector learned_embeds
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise EmbeddingError(f"{path}: expected embedding vectors (n, D), got an array of shape {vectors.shape}")
    if not jnp.issubdtype(vectors.dtype, jnp.floating):  # bfloat16 included
        raise EmbeddingError(f"{path}: expected floating-point vectors, got {vectors.dtype}")
    vectors = vectors.astype(np.float32)
    if not np.isfinite(vectors).all():
        raise EmbeddingError(f"{path}: the vectors hold NaN or infinite values")
    return vectors


def short_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's hash of an embedding in an image's "TI hashes": the first 12 hex digits of the file's
    sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:SHORT_HASH_LENGTH]


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    tensors = read_safetensors(path)
    return {name: tensors[name] for name in tensors}


def _read_pickle(path: Path) -> Any:
    """The pickled object with tensors as numpy arrays, through torch's restricted (`weights_only`) unpickler."""
    try:
        import torch
    except ImportError as e:
        raise EmbeddingError(f"{path}: reading pickled embeddings needs torch: pip install 'sd_jax[torch]'") from e
    try:
        # The original textual-inversion code saved `string_to_param` as a ParameterDict: a torch container, whose
        # rebuilding runs nothing from the file.
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The restricted unpickler names what it refused ("GLOBAL posix.system"); other refusals are opcodes it
        # does not know, from a file that is not torch's format or is damaged.
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused is not None:
            raise EmbeddingError(
                f"{path}: refusing to load: the pickle names {refused.group(1)}, which is not a tensor or a plain "
                "container; it may run code"
            ) from e
        raise EmbeddingError(f"{path}: not a readable PyTorch file (not torch.save's format, or corrupt)") from e
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EmbeddingError(f"{path}: not a readable PyTorch file (truncated or corrupt?): {first_line}") from e
    return _to_numpy(loaded, torch)


def _to_numpy(value: Any, torch) -> Any:
    if isinstance(value, torch.Tensor):
        return tensor_to_numpy(value)
    if isinstance(value, torch.nn.ParameterDict):
        value = dict(value.items())
    if isinstance(value, Mapping):
        return {key: _to_numpy(item, torch) for key, item in value.items()}
    return value


def _vectors_of(data: Any, path: Path) -> np.ndarray:
    """The one tensor of an embedding file, as AUTOMATIC1111 finds it."""
    if isinstance(data, np.ndarray):  # a bare tensor saved with torch.save
        return data
    if not isinstance(data, Mapping):
        raise EmbeddingError(f"{path}: not an embedding: expected a dict of tensors, got {type(data).__name__}")
    if A1111_KEY in data:
        params = data[A1111_KEY]
        tensors = [v for v in params.values() if isinstance(v, np.ndarray)] if isinstance(params, Mapping) else []
        if len(tensors) != 1:
            raise EmbeddingError(f"{path}: expected one tensor in '{A1111_KEY}', found {len(tensors)}")
        return tensors[0]
    if "clip_l" in data and "clip_g" in data:
        raise EmbeddingError(f"{path}: an SDXL embedding (clip_l, clip_g); only SD 1.x / 2.x embeddings are supported")
    tensors = {key: v for key, v in data.items() if isinstance(v, np.ndarray)}
    if SAFETENSORS_KEY in tensors:
        return tensors[SAFETENSORS_KEY]
    if len(tensors) != 1:
        found = "no vectors" if not tensors else f"{len(tensors)} tensors ({', '.join(map(str, tensors))})"
        raise EmbeddingError(f"{path}: not an embedding: {found}, expected '{A1111_KEY}' or one tensor")
    return next(iter(tensors.values()))


@dataclasses.dataclass(frozen=True)
class EmbeddingFile:
    """One file of a library as last seen on disk; `mtime_ns` and `size` tell a rewritten file from the old one."""

    name: str
    path: Path
    mtime_ns: int
    size: int


class EmbeddingLibrary:
    """A folder of embeddings, by name (the file name without its suffix, as AUTOMATIC1111 names them).

    Subfolders are searched too; hidden and empty files and other suffixes are skipped. Of two files with one name
    the one nearer the top wins, then the first in sorted order. The folder is listed again (one `stat` per file) each
    time it is asked for a vocabulary, so files added, replaced or removed take effect on the next prompt; a file is
    read when a prompt first uses its name, and read again only when it changes on disk.

    Args:
      folder: the embeddings folder (it must exist).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise EmbeddingError(f"{self.folder}: no such embeddings folder")
        self.version = 0  # counts the changes seen on disk; with the library it keys whatever was built from it
        self._files: dict[str, EmbeddingFile] = {}
        self._vectors: dict[EmbeddingFile, np.ndarray] = {}
        self._vocabulary: EmbeddingVocabulary | None = None

    def scan(self) -> dict[str, EmbeddingFile]:
        """The folder's embedding files by name, listed now (a vanished folder has none)."""
        found: dict[str, EmbeddingFile] = {}
        visited: set[str] = set()
        for root, folders, names in os.walk(self.folder, followlinks=True):
            real = os.path.realpath(root)
            if real in visited:  # a link back up the tree
                folders[:] = []
                continue
            visited.add(real)
            folders[:] = sorted(f for f in folders if not f.startswith("."))
            for filename in sorted(names):
                stem, suffix = os.path.splitext(filename)
                if filename.startswith(".") or suffix.lower() not in EMBEDDING_SUFFIXES or stem in found:
                    continue
                path = Path(root, filename)
                try:
                    stat = path.stat()
                except OSError:  # removed while listing, or a broken link
                    continue
                if stat.st_size > 0:
                    found[stem] = EmbeddingFile(stem, path, stat.st_mtime_ns, stat.st_size)
        return found

    def files(self) -> dict[str, Path]:
        """The embeddings' paths by name, sorted by name."""
        self._refresh()
        return {name: self._files[name].path for name in sorted(self._files)}

    def _refresh(self) -> None:
        files = self.scan()
        if files != self._files:
            self._files = files
            self.version += 1
            kept = set(files.values())
            self._vectors = {f: v for f, v in self._vectors.items() if f in kept}

    def read(self, file: EmbeddingFile) -> np.ndarray:
        """The vectors of one of the library's files, (n, D) float32, read once per version of the file.

        Raises:
          EmbeddingError: see `read_embedding`.
        """
        if file not in self._vectors:
            self._vectors[file] = read_embedding(file.path)
        return self._vectors[file]

    def vocabulary(self, tokenizer, width: int) -> EmbeddingVocabulary:
        """The embeddings' names as token sequences for one text encoder, after listing the folder again.

        Args:
          tokenizer: the CLIP tokenizer the prompts go through (names are tokenized by it, as AUTOMATIC1111 does).
          width: the text encoder's token-embedding width; a used embedding of another width is an EmbeddingError.
        """
        self._refresh()
        cached = self._vocabulary
        if cached is None or cached.key != (id(self), self.version, width) or cached.tokenizer is not tokenizer:
            self._vocabulary = EmbeddingVocabulary(self, self._files, tokenizer, width)
        return self._vocabulary


class EmbeddingVocabulary:
    """A library's names for one tokenizer and width, as `sd_jax.prompts.tokenize_prompt` matches them.

    It stands for the library at one version: `key` is equal for two vocabularies exactly when they would embed
    every prompt alike (as long as the library's files do not change).
    """

    def __init__(self, library: EmbeddingLibrary, files: Mapping[str, EmbeddingFile], tokenizer, width: int):
        """Args: library: where the files are read (and their vectors kept); files: its files by name, as listed at
        `library.version`; tokenizer, width: see `EmbeddingLibrary.vocabulary`."""
        self.library = library
        self.files = dict(files)
        self.tokenizer = tokenizer
        self.width = width
        self.version = library.version
        names = sorted(self.files)
        ids = tokenizer(names, add_special_tokens=False, verbose=False)["input_ids"] if names else []
        # First token -> [(token sequence, name)], longest first: the longest name wins where names share a start.
        self._by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name, name_ids in zip(names, ids, strict=True):
            if name_ids:  # a name the tokenizer drops entirely can never be written in a prompt
                self._by_first.setdefault(int(name_ids[0]), []).append((tuple(int(i) for i in name_ids), name))
        for candidates in self._by_first.values():
            candidates.sort(key=lambda c: -len(c[0]))

    @property
    def key(self) -> tuple:
        """Identifies the names and files this vocabulary stands for (for caches of embedded prompts)."""
        return (id(self.library), self.version, self.width)

    def match(self, tokens: Sequence[int], position: int) -> tuple[str, int] | None:
        """The embedding whose name's tokens start at `tokens[position]`, and how many tokens the name spans."""
        for name_ids, name in self._by_first.get(int(tokens[position]), ()):
            if tuple(tokens[position : position + len(name_ids)]) == name_ids:
                return name, len(name_ids)
        return None

    def vector_count(self, name: str) -> int:
        """How many token positions the embedding takes in a prompt (reads and checks its file)."""
        return len(self.vectors(name))

    def vectors(self, name: str) -> np.ndarray:
        """The embedding's vectors, (n, width) float32.

        Raises:
          EmbeddingError: the file is unreadable or of another width (naming the file).
        """
        file = self.files[name]
        vectors = self.library.read(file)
        if vectors.shape[1] != self.width:
            family = {768: " (an SD 1.x embedding)", 1024: " (an SD 2.x embedding)"}.get(vectors.shape[1], "")
            raise EmbeddingError(
                f"{file.path}: embedding vectors of width {vectors.shape[1]}{family} do not fit this model's text "
                f"encoder (width {self.width})"
            )
        return vectors

    def path(self, name: str) -> Path:
        """The file of the embedding `name`."""
        return self.files[name].path
