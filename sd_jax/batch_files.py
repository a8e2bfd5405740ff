"""The model-free half of a resumable batch job: a prompts file's lines as requests, the images' output names, the
append-only manifest, and which images each process makes.

    requests = read_requests("prompts.jsonl", defaults)   # one validated Request per line
    jobs = split_for_process(expand(requests), process_id, num_processes, key=compiled_shape)
    clean_temporary(output_dir, [job.name for job in jobs])
    done, unrecorded = resume_state(output_dir, jobs, manifest_path)

A job survives a kill because an image's name derives from its line and index (`image_name`), not from a counter;
each image is written under `temporary_name` and renamed; the manifest is append-only and synced after each record.
On restart the output folder is the truth: an image whose file exists is done, whatever the manifest says.

Prompts files: a `.jsonl` (or `.json`) file has one JSON object per line, whose keys are `GenerationSettings` fields
plus `mode`, `init_image` and `mask` (paths relative to the file's folder):

    {"prompt": "a red circle", "steps": 20, "seed": 3}
    {"mode": "img2img", "prompt": ["a cat", "a dog"], "init_image": "photos/cat.png", "strength": 0.6}

Any other file has one prompt per line. In both, blank lines and lines starting with `#` are skipped, and a line's
settings are the defaults (the command's flags) for its mode's fields, overridden by what the line gives.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sd_jax.settings import IMAGE_MODES, MODES, GenerationSettings

JSONL_SUFFIXES = (".jsonl", ".json")
INIT_IMAGE_MODES = IMAGE_MODES
MASK_INPUT_MODES = ("inpaint",)  # outpaint makes its own mask from the margins
# The input images a line may take: key (and flag) name, what it is, the modes that take it.
INPUTS = (("init_image", "an init image", INIT_IMAGE_MODES), ("mask", "a mask", MASK_INPUT_MODES))
MANIFEST_GLOB = "manifest*.jsonl"
STATUSES = ("done", "failed")
_TEMPORARY = ".tmp-"

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Request:
    """One line of a prompts file: its validated settings and its input images' absolute paths."""

    line: int  # 1-based physical line number in the file
    settings: GenerationSettings
    init_image: str | None = None
    mask: str | None = None

    @property
    def num_images_total(self) -> int:
        """Images the line makes: each prompt num_images times."""
        return len(self.settings.prompts) * self.settings.num_images

    def image_seeds(self) -> list[int]:
        """Each image's seed, prompt-major as the pipeline makes them: image i uses seed + i."""
        return [self.settings.seed + i for i in range(self.num_images_total)]


@dataclasses.dataclass(frozen=True)
class ImageJob:
    """One image of a request: its index within the line, its seed and its prompt."""

    request: Request
    index: int
    seed: int
    prompt: str
    negative_prompt: str

    @property
    def line(self) -> int:
        """The request's line in the prompts file."""
        return self.request.line

    @property
    def name(self) -> str:
        """The image's final file name."""
        return image_name(self.request.line, self.index)

    @property
    def settings(self) -> GenerationSettings:
        """The line's settings for this image alone (one prompt, one image, its own seed).

        A pipeline call with these makes the line's image `index`, except where a mode draws noise from the call's
        seed rather than the image's (inpaint's and outpaint's fill of the new area)."""
        return dataclasses.replace(
            self.request.settings,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            num_images=1,
        )


# ---------------------------------------------------------------------------------------------------------------
# Reading the prompts file


@dataclasses.dataclass(frozen=True)
class BadLine:
    """A line of a prompts file that is not a valid request: its number and the one-line error naming it."""

    line: int
    error: str  # "<path>:<line>: <what is wrong>"


def read_prompts_file(
    path: str | os.PathLike,
    defaults: Mapping[str, Any],
    *,
    default_mode: str = "txt2img",
    init_image: str | None = None,
    mask: str | None = None,
) -> tuple[list[Request], list[BadLine]]:
    """The requests of a prompts file, one per non-blank, non-comment line, validated; a bad line (unparsable JSON,
    an unknown field, an invalid value, a missing image) is set aside without stopping the others.

    Args:
      path: a `.jsonl` / `.json` file (one JSON object per line) or a text file (one prompt per line).
      defaults: settings field -> value (the command's flags); a line takes those of its mode's fields, and a value
        of None leaves the field's own default (e.g. strength: the mode's).
      default_mode: the mode of text lines and of JSON lines that give none.
      init_image, mask: the input images of lines that take them and give none (relative to the working folder).

    Returns:
      (requests, bad lines), each in file order.

    Raises:
      FileNotFoundError: no such file.
      ValueError: one line, for what spoils the whole file: not UTF-8, no valid line at all (the first bad line's
        error), an unknown default mode, an input image argument no line can take.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    if default_mode not in MODES:
        raise ValueError(f"unknown default mode {default_mode!r}; choose one of {', '.join(MODES)}")
    jsonl = path.name.lower().endswith(JSONL_SUFFIXES)
    if not jsonl:
        # Every line of a text file has the default mode, so an input it does not take is surely a mistake.
        for (name, _, modes), value in zip(INPUTS, (init_image, mask), strict=True):
            if value is not None and default_mode not in modes:
                raise ValueError(f"{path}: {name} given, but {default_mode} takes none")
    arguments = {
        name: None if value is None else str(Path(value).resolve())
        for (name, _, _), value in zip(INPUTS, (init_image, mask), strict=True)
    }
    folder = path.resolve().parent
    requests, bad = [], []
    for number, text in _lines(path):
        try:
            if jsonl:
                mode, options, inputs = _parse_json_line(text, default_mode, folder)
            else:
                mode, options, inputs = default_mode, {"prompt": text}, {}
            requests.append(_request(number, mode, options, inputs, defaults, arguments))
        except ValueError as e:
            bad.append(BadLine(number, f"{path}:{number}: {_one_line(e)}"))
    if not requests:
        raise ValueError(bad[0].error if bad else f"{path}: no requests (every line is blank or a comment)")
    return requests, bad


def read_requests(
    path: str | os.PathLike,
    defaults: Mapping[str, Any],
    *,
    default_mode: str = "txt2img",
    init_image: str | None = None,
    mask: str | None = None,
) -> list[Request]:
    """`read_prompts_file`'s requests, for a file that must have no bad line: the first raises its one-line
    ValueError (`<path>:<line>: <what is wrong>`)."""
    requests, bad = read_prompts_file(path, defaults, default_mode=default_mode, init_image=init_image, mask=mask)
    if bad:
        raise ValueError(bad[0].error)
    return requests


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped text) of each line that is neither blank nor a `#` comment."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # an editor's byte-order mark is not part of the first prompt
    except UnicodeDecodeError as e:
        number = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{number}: not UTF-8 text ({e.reason})") from None
    # Split on "\n" only: str.splitlines also breaks at form feeds and U+2028, which would shift line numbers.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield number, line


def _parse_json_line(text: str, default_mode: str, folder: Path) -> tuple[str, dict, dict]:
    """A JSON line's mode, settings options and input paths (resolved against the prompts file's folder)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"a line must be a JSON object, got {type(data).__name__}")
    mode = data.pop("mode", default_mode)
    inputs = {}
    for name, _, _ in INPUTS:
        value = data.pop(name, None)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a path, got {value!r}")
        inputs[name] = str((folder / value).resolve())  # an absolute path stays as it is
    return mode, data, inputs


def _request(
    number: int, mode: Any, options: dict, inputs: dict, defaults: Mapping[str, Any], arguments: dict
) -> Request:
    """A line's validated Request; raises a ValueError without the file and line (the caller adds them)."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    allowed = GenerationSettings.fields_for(mode)
    merged = {k: defaults[k] for k in allowed if defaults.get(k) is not None}
    merged.update(options)
    if "prompt" not in merged:
        raise ValueError('no prompt: give "prompt" in the line or a default prompt')
    try:
        # from_json names any key the mode does not take (a typo, or another mode's field) in a one-line error.
        settings = GenerationSettings.from_json({"mode": mode, **merged}).validate()
    except TypeError as e:
        raise ValueError(str(e)) from None

    paths = {}
    for name, noun, modes in INPUTS:
        given = inputs.get(name)
        if mode not in modes:
            if given is not None:
                raise ValueError(f"{mode} takes no {name}")
            continue  # an argument for other modes' lines, as a default of another mode's field
        given = given if given is not None else arguments[name]
        if given is None:
            raise ValueError(f'{mode} needs {noun}: give "{name}" in the line or --{name}')
        if not Path(given).is_file():
            raise ValueError(f"{name} not found: {given}")
        paths[name] = given
    return Request(line=number, settings=settings, **paths)


def _one_line(message: object) -> str:
    return " ".join(str(message).splitlines())


# ---------------------------------------------------------------------------------------------------------------
# Output names and the manifest


def image_name(line: int, index: int) -> str:
    """The file name of image `index` of line `line`; names sort in file order."""
    return f"{line:06d}-{index:03d}.png"


def temporary_name(final: str) -> str:
    """The name an image is written under before being renamed to `final` (hidden; the writer's process id keeps two
    writers apart). It does not end in .png: give the image format explicitly when saving."""
    return f".{final}{_TEMPORARY}{os.getpid()}"


def _final_of(name: str) -> str | None:
    """The final name a temporary name stands for, or None for any other name."""
    if not name.startswith(".") or _TEMPORARY not in name:
        return None
    final, _, pid = name[1:].rpartition(_TEMPORARY)
    return final if final and pid.isdigit() else None


def clean_temporary(output_dir: str | os.PathLike, finals: Iterable[str] | None = None) -> list[str]:
    """Deletes the temporary files a kill left in `output_dir`; returns their names, sorted.

    Args:
      finals: only the temporaries of these final names (this process's images), so that a process starting late
        does not delete the files another process is writing; None: every temporary.
    """
    wanted = None if finals is None else set(finals)
    removed = []
    try:
        entries = list(os.scandir(output_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        final = _final_of(entry.name)
        if final is None or (wanted is not None and final not in wanted) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(entry.name)
    return sorted(removed)


def manifest_name(process_id: int, num_processes: int) -> str:
    """The manifest's file name: one per process, so that no two processes append to the same file."""
    if num_processes == 1:
        return "manifest.jsonl"
    return f"manifest-{process_id:05d}-of-{num_processes:05d}.jsonl"


def bad_line_record(bad: BadLine) -> dict[str, Any]:
    """The manifest record of a line that is not a valid request (it has no images: index, seed and file are null)."""
    keys = ("line", "index", "seed", "file", "status", "seconds", "settings", "error")
    return dict(zip(keys, (bad.line, None, None, None, "failed", None, None, bad.error), strict=True))


def image_record(job: ImageJob, status: str, seconds: float | None, error: str | None = None) -> dict[str, Any]:
    """A manifest record: line, index, seed, file, status ("done" or "failed"), seconds, settings (the line's, as
    JSON) and, when failed, the error."""
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; choose one of {', '.join(STATUSES)}")
    record = {
        "line": job.line,
        "index": job.index,
        "seed": job.seed,
        "file": job.name,
        "status": status,
        "seconds": None if seconds is None else round(float(seconds), 3),
        "settings": job.request.settings.to_json(),
    }
    if status == "failed":
        record["error"] = _one_line(error) if error is not None else ""
    return record


class Manifest:
    """An append-only JSONL file of image records; each record is on disk before `append` returns."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        torn = _ends_mid_line(self.path)
        self._file = open(self.path, "ab")
        if torn:
            # A kill mid-record left a partial line: end it, so that the next record is a line of its own.
            self._write(b"\n")

    def append(self, record: Mapping[str, Any]) -> None:
        """Writes `record` as one JSON line, flushed and synced."""
        self._write((json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))

    def _write(self, data: bytes) -> None:
        self._file.write(data)  # one write per record: a kill can tear only the last line
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _ends_mid_line(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a manifest, in order; lines that are not JSON objects (a record torn by a kill) are skipped,
    and a missing file has none."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for line in data.split(b"\n"):
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def finished_images(
    output_dir: str | os.PathLike, manifest_records: Iterable[Mapping[str, Any]]
) -> set[tuple[int, int]]:
    """The (line, index) of "done" records whose image file exists in `output_dir` (a record without its file is
    redone)."""
    return _recorded_done(manifest_records) & _pairs_present(output_dir)


def resume_state(
    output_dir: str | os.PathLike,
    wanted: Iterable[Request | ImageJob],
    manifest_path: str | os.PathLike | None = None,
) -> tuple[set[tuple[int, int]], list[tuple[int, int]]]:
    """What a restarted job may skip, and what it must still record.

    Args:
      wanted: the images this process makes (its ImageJobs; a Request stands for all its images).
      manifest_path: this process's manifest. The folder's other manifests count too, so that an image recorded by a
        run with another number of processes is not recorded again.

    Returns:
      done: the wanted (line, index) whose final file exists (written under a temporary name then renamed, so an
        existing final name is complete), whatever the manifest says.
      unrecorded: the done images without a "done" record (a kill between the rename and the append), sorted; the
        caller appends their records.
    """
    pairs = set()
    for item in wanted:
        if isinstance(item, Request):
            pairs.update((item.line, i) for i in range(item.num_images_total))
        else:
            pairs.add((item.line, item.index))
    done = pairs & _pairs_present(output_dir)
    manifests = set(Path(output_dir).glob(MANIFEST_GLOB))
    if manifest_path is not None:
        manifests.add(Path(manifest_path))
    recorded = _recorded_done(record for p in sorted(manifests) for record in read_manifest(p))
    return done, sorted(done - recorded)


def _recorded_done(records: Iterable[Mapping[str, Any]]) -> set[tuple[int, int]]:
    return {
        (r["line"], r["index"])
        for r in records
        if r.get("status") == "done" and isinstance(r.get("line"), int) and isinstance(r.get("index"), int)
    }


def _pairs_present(output_dir: str | os.PathLike) -> set[tuple[int, int]]:
    """(line, index) of every final image name in `output_dir`; one directory listing, not a stat per image."""
    pairs = set()
    try:
        entries = list(os.scandir(output_dir))
    except FileNotFoundError:
        return pairs
    for entry in entries:
        stem, dot, suffix = entry.name.partition(".")
        line, dash, index = stem.partition("-")
        if suffix == "png" and dash and line.isdigit() and index.isdigit() and entry.is_file():
            pair = (int(line), int(index))
            if image_name(*pair) == entry.name:  # only names image_name makes (not "7-0.png")
                pairs.add(pair)
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# Splitting work across processes


def expand(requests: Iterable[Request]) -> list[ImageJob]:
    """Every image of the requests, in file order (within a line, prompt-major as the pipeline makes them)."""
    jobs = []
    for request in requests:
        s = request.settings
        prompts, negatives = s.prompts, s.negative_prompts
        for index, seed in enumerate(request.image_seeds()):
            p = index // s.num_images
            jobs.append(ImageJob(request, index, seed, prompts[p], negatives[p]))
    return jobs


def split_for_process(
    jobs: Sequence[T], process_id: int, num_processes: int, key: Callable[[T], Hashable] | None = None
) -> list[T]:
    """This process's share of `jobs`, the same in every process without any communication.

    Jobs are grouped by `key` (what shapes the compiled program; None: one group), groups ordered by first appearance,
    and each group dealt round-robin. The deal goes on from where the previous group's stopped, so that many small
    groups (e.g. one line per image size) still spread over all processes and the shares differ by at most one.

    Returns:
      This process's jobs, group by group, each group in the order given.
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id!r}")
    groups: dict[Hashable, list[T]] = {}  # dicts keep insertion order: groups by first appearance
    for job in jobs:
        groups.setdefault(None if key is None else key(job), []).append(job)
    mine, dealt = [], 0
    for members in groups.values():
        mine += [job for j, job in enumerate(members) if (dealt + j) % num_processes == process_id]
        dealt += len(members)
    return mine
