"""A LoRA folder: names to files (`<lora:NAME:W>`), and the files read once and kept while they are unchanged.

A name is a file's stem, anywhere under the folder (subfolders included, as the web UI searches them); a name that
is an existing file's path is that file, with or without a folder. Two files of one stem are ambiguous and a name
that matches them is an error that lists them. A file changed on disk (size or modification time) is read again.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

from sd_jax.lora import LORA_SUFFIXES, LoRAError, LoRAFile, read_lora

CACHE_SIZE = 16  # LoRA files kept read (their up/down matrices, and deltas computed from them)


def _stamp(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


class LoRALibrary:
    """The LoRA files of a folder (or none: then only paths resolve)."""

    def __init__(self, folder: str | os.PathLike | None = None, *, names_only: bool = False):
        """names_only: resolve only the names of the folder's files, never a path (a server's requests)."""
        if folder is not None and not Path(folder).is_dir():
            raise LoRAError(f"--lora_dir {folder}: no such folder")
        self.folder = None if folder is None else Path(folder)
        self.names_only = names_only
        self._files: OrderedDict[tuple, LoRAFile] = OrderedDict()

    def names(self) -> dict[str, list[Path]]:
        """Every LoRA file of the folder by name (file stem), found afresh (files come and go)."""
        found: dict[str, list[Path]] = {}
        if self.folder is None:
            return found
        for path in sorted(self.folder.rglob("*")):
            if path.suffix.lower() in LORA_SUFFIXES and path.is_file():
                found.setdefault(path.stem, []).append(path)
        return found

    def resolve(self, name: str) -> Path:
        """The file a name means: a path to a file (unless `names_only`), or a file of the folder whose stem is
        `name`."""
        if self.names_only:  # a path only as one of the folder's files (what `stamp` keeps is a resolved path)
            resolved = Path(name).resolve()
            for paths in self.names().values():
                if any(path.resolve() == resolved for path in paths):
                    return resolved
        elif Path(name).suffix.lower() in LORA_SUFFIXES:
            direct = Path(name) if self.folder is None else self.folder / name
            for path in (Path(name), direct):
                if path.is_file():
                    return path
        matches = self.names().get(name, [])
        if len(matches) > 1:
            listed = f"{len(matches)} of them" if self.names_only else ", ".join(map(str, matches))
            raise LoRAError(f"<lora:{name}>: several files are named {name!r}: {listed}")
        if not matches:
            where = f"in {self.folder}" if self.folder is not None else "(no --lora_dir given)"
            if self.names_only:
                where = "in the LoRA folder"
            raise LoRAError(f"<lora:{name}>: no LoRA file named {name!r} {where}")
        return matches[0]

    def name_of_hash(self, digest: str) -> str | None:
        """The name of the folder's file whose AUTOMATIC1111 short hash is `digest` (as an image's "Lora hashes"
        give it), or None. Reads every file of the folder: for names an image gives that the folder lacks."""
        from sd_jax.lora import short_hash

        for name, paths in self.names().items():
            if any(short_hash(path) == digest.lower() for path in paths):
                return name
        return None

    def stamp(self, name: str) -> tuple:
        """What identifies the file a name means, as it is now: (resolved path, size, mtime)."""
        return _stamp(self.resolve(name))

    def read(self, name: str) -> LoRAFile:
        """The LoRA file a name means, read (or kept from an earlier read of the unchanged file)."""
        stamp = self.stamp(name)
        if stamp in self._files:
            self._files.move_to_end(stamp)
            return self._files[stamp]
        lora = read_lora(stamp[0])
        self._files[stamp] = lora
        while len(self._files) > CACHE_SIZE:
            self._files.popitem(last=False)
        return lora
