"""The models a server may load: the folder `--models_dir` and the model it started with, by name only.

A request or an option names a model by its title (`name [hash]`), its name or its hash, as AUTOMATIC1111's
`sd_model_checkpoint` does; a path is never accepted, so no request can make the server read a file of its choosing.

    store = ModelStore("models", initial=None)       # None: the default model
    store.entries()                                   # what GET /sdapi/v1/sd-models lists
    entry = store.find("sd15")                        # by title, name or hash; KeyError if unknown
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from sd_jax import checkpoint, infotext
from sd_jax.loading import DEFAULT_MODEL, RANDOM_PREFIX

_MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One loadable model. `source` is what `sd_jax.load` takes (a path, `random:NAME`, or None: the default)."""

    name: str
    source: str | None
    path: Path | None  # the file or folder (None for random weights)

    @property
    def hash(self) -> str | None:
        """AUTOMATIC1111's short model hash (first 10 hex digits of the weights' sha256), computed once per file."""
        if self.path is None:
            return None
        return infotext.model_hash(self.path)

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    @property
    def sha256(self) -> str | None:
        if self.path is None or not self.path.is_file():
            return None
        return infotext.remembered_hash("sha256", _sha256, [self.path])

    def a1111(self) -> dict:
        """The entry as GET /sdapi/v1/sd-models lists it (`filename`: the name, never a server path)."""
        return {
            "title": self.title,
            "model_name": self.name,
            "hash": self.hash,
            "sha256": self.sha256,
            "filename": self.name,
            "config": None,
        }


def _sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    with open(files[0], "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _is_model(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if path.is_file():
        return path.suffix.lower() in _MODEL_FILE_SUFFIXES
    return path.is_dir() and (
        checkpoint.is_converted(path) or (path / "model_index.json").is_file() or (path / "unet").is_dir()
    )


class ModelStore:
    """The models of `models_dir` (files and folders directly inside it) and the initial model."""

    def __init__(self, models_dir: str | os.PathLike | None, initial: str | None = None):
        """Args:
        models_dir: the folder of loadable models, or None (only the initial model).
        initial: the model the server starts with: a name in `models_dir`, a path, `random:NAME`, or None for the
          default model."""
        self.models_dir = Path(models_dir) if models_dir is not None else None
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise ValueError(f"--models_dir {models_dir}: no such folder")
        self.initial = self._initial_entry(initial)

    def _initial_entry(self, initial: str | None) -> ModelEntry:
        if initial is None:
            return ModelEntry(DEFAULT_MODEL.name, None, DEFAULT_MODEL)
        if initial.startswith(RANDOM_PREFIX):
            return ModelEntry(initial, initial, None)
        if self.models_dir is not None and _is_model(self.models_dir / initial):
            path = self.models_dir / initial
            return ModelEntry(_name_of(path), str(path), path)
        path = Path(initial)
        if not path.exists():
            raise ValueError(f"--model {initial}: no such file or folder")
        return ModelEntry(_name_of(path), str(path), path)

    def entries(self) -> list[ModelEntry]:
        """The initial model, then the folder's models by name."""
        entries = [self.initial]
        if self.models_dir is not None:
            for path in sorted(self.models_dir.iterdir()):
                if _is_model(path) and path.resolve() != (self.initial.path or Path()).resolve():
                    entries.append(ModelEntry(_name_of(path), str(path), path))
        return entries

    def find(self, name: str) -> ModelEntry:
        """The model a title, name, file name or hash names; KeyError (with the names known) if none does."""
        name = name.strip()
        entries = self.entries()
        for matches in (
            lambda e: e.title == name,
            lambda e: e.name == name,
            lambda e: e.path is not None and e.path.name == name,
            lambda e: e.hash is not None and name in (e.hash, f"[{e.hash}]"),
        ):
            found = [e for e in entries if matches(e)]
            if found:
                return found[0]
        raise KeyError(f"unknown model {name!r}; available: {', '.join(e.title for e in entries)}")


def _name_of(path: Path) -> str:
    """A model's name: a file's name without its weights suffix, a folder's name."""
    return path.stem if path.is_file() and path.suffix.lower() in _MODEL_FILE_SUFFIXES else path.name
