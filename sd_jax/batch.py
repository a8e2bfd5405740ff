"""A resumable batch job: every image of a prompts file, in full device batches, written as its batch finishes.

    pipe = sd_jax.load(model)
    requests = batch_files.read_requests("prompts.jsonl", defaults)
    summary = run_job(pipe, requests, "outputs/job", model=model, dtype="float32")

Requests are grouped by what shapes the compiled program (`StableDiffusionPipeline.group_key`: mode, size,
sampler, prompt-length bucket, ...); each group is cut into calls of `batch_size` images, mixing lines freely, so
that only a group's last call is padded and settings that stay data (steps, guidance, seed, strength, ...) share one
executable. An image is a pure function of its line and index, whichever call, process or device made it.

Kill-safe: an image is written under a temporary name and renamed, then its record is appended to the manifest;
a rerun of the same command skips every image whose file exists (`batch_files.resume_state`) and makes the rest.
Several processes (hosts) split the images deterministically (`batch_files.split_for_process`), each on its own
devices, writing its own manifest; their outputs together are what one process makes alone.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sd_jax import batch_files, generation, infotext
from sd_jax.batch_files import BadLine, ImageJob, Request
from sd_jax.images import save_png_as

_FAILED = ("failed",)  # the group of lines that could not be prepared
# A line's own fault (an unreadable image, a mask of another size): its images fail and the job goes on.
_LINE_ERRORS = (ValueError, OSError)


def _message(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@dataclasses.dataclass
class Summary:
    """What a run of a job did (this process's share)."""

    done: int = 0  # images made by this run
    skipped: int = 0  # already finished by an earlier run
    failed: int = 0  # images that failed (bad lines of the prompts file count one each)
    seconds: float = 0.0
    groups: int = 0  # distinct compiled-program groups among this process's images
    executables: int = 0  # generation programs compiled

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"done {self.done}, skipped {self.skipped} (already finished), failed {self.failed}; "
            f"{self.seconds:.1f} s, {self.images_per_second:.3f} images/s; "
            f"{self.groups} groups, {self.executables} executables compiled"
        )


def run_job(
    pipe,
    requests: Sequence[Request],
    output_dir: str,
    *,
    bad_lines: Sequence[BadLine] = (),
    model: str | None,
    dtype: str,
    process_id: int = 0,
    num_processes: int = 1,
    batch_size: int | None = None,
    watermark: bool = True,
    show_progress: bool = True,
) -> Summary:
    """Makes this process's share of the requests' images in `output_dir`, skipping those already there.

    Args:
      pipe: the loaded pipeline (its mesh: this process's devices).
      requests: the prompts file's valid lines (`batch_files.read_prompts_file`).
      bad_lines: its invalid lines: process 0 records each as failed (once, however often the job is resumed).
      model, dtype: as the user gave them, for the images' metadata.
      batch_size: images per compiled call, rounded up to a multiple of devices x micro-batch (the default).
      watermark: embed the model family's invisible watermark.
      show_progress: a bar of images (done/total, images/s, ETA).

    Returns:
      The run's `Summary`; each image also has a record in the manifest.
    """
    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_call = pipe.mesh.size * pipe.micro_batch
    batch_size = per_call if batch_size is None else -(-max(1, batch_size) // per_call) * per_call
    payload = None
    if watermark:
        from sd_jax.watermark import PAYLOADS

        payload = PAYLOADS[pipe.config.family]

    keys, errors = _group_keys(pipe, requests)
    jobs = batch_files.split_for_process(
        batch_files.expand(requests), process_id, num_processes, key=lambda job: keys[job.line]
    )
    summary = Summary(groups=len({keys[job.line] for job in jobs}))
    batch_files.clean_temporary(out, [job.name for job in jobs])
    manifest_path = out / batch_files.manifest_name(process_id, num_processes)
    done, unrecorded = batch_files.resume_state(out, jobs, manifest_path)
    by_pair = {(job.line, job.index): job for job in jobs}
    todo = [job for job in jobs if (job.line, job.index) not in done]
    summary.skipped = len(jobs) - len(todo)
    compiled_before = pipe.program.compiled_count()

    recorded_failures = {
        (r.get("line"), r.get("index"), r.get("error"))
        for r in batch_files.read_manifest(manifest_path)
        if r.get("status") == "failed"
    }

    def record_failure(record: dict) -> None:
        summary.failed += 1
        if (record["line"], record["index"], record["error"]) not in recorded_failures:  # a resume records it once
            manifest.append(record)

    bar = _bar(len(jobs), summary.skipped) if show_progress else None
    with batch_files.Manifest(manifest_path) as manifest:
        for pair in unrecorded:  # killed between an image's rename and its record
            manifest.append(batch_files.image_record(by_pair[pair], "done", None))
        if process_id == 0:
            for bad in bad_lines:
                record_failure(batch_files.bad_line_record(bad))
        for group in _in_groups(todo, keys):
            if keys[group[0].line] == _FAILED:
                for job in group:
                    record_failure(batch_files.image_record(job, "failed", None, errors[job.line]))
                _advance(bar, len(group))
                continue
            prepared: dict[int, object] = {}
            remaining = _count_by_line(group)
            for i in range(0, len(group), batch_size):
                calls = group[i : i + batch_size]
                made = _make(pipe, calls, prepared, errors, batch_size)
                for job, result, seconds in made:
                    if isinstance(result, str):
                        record_failure(batch_files.image_record(job, "failed", None, result))
                        continue
                    texts = infotext.image_texts(pipe, job.settings, [result], [job.seed], model=model, dtype=dtype)[0]
                    save_png_as(result, out / job.name, texts, watermark=payload, temporary=_temporary(job))
                    manifest.append(batch_files.image_record(job, "done", seconds))
                    summary.done += 1
                _advance(bar, len(calls))
                for job in calls:  # a line's prepared arrays go once its last image is made
                    remaining[job.line] -= 1
                    if not remaining[job.line]:
                        prepared.pop(job.line, None)
    if bar is not None:
        bar.close()
    summary.seconds = time.perf_counter() - start
    summary.executables = pipe.program.compiled_count() - compiled_before
    return summary


def _temporary(job: ImageJob) -> str:
    return batch_files.temporary_name(job.name)


def _group_keys(pipe, requests: Sequence[Request]) -> tuple[dict[int, tuple], dict[int, str]]:
    """Each line's group key (computed without running a model), and the one-line error of lines that cannot be
    made (an unreadable image, a mask of the wrong size): those form the group `_FAILED`."""
    keys, errors = {}, {}
    for request in requests:
        try:
            keys[request.line] = pipe.group_key(request.settings, request.init_image, request.mask)
        except _LINE_ERRORS as e:
            keys[request.line] = _FAILED
            errors[request.line] = _message(e)
    return keys, errors


def _in_groups(jobs: Sequence[ImageJob], keys: dict[int, tuple]) -> list[list[ImageJob]]:
    """The jobs by group key, groups in order of first appearance, jobs in the order given."""
    groups: dict[tuple, list[ImageJob]] = {}
    for job in jobs:
        groups.setdefault(keys[job.line], []).append(job)
    return list(groups.values())


def _count_by_line(jobs: Sequence[ImageJob]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for job in jobs:
        counts[job.line] = counts.get(job.line, 0) + 1
    return counts


def _make(
    pipe, jobs: Sequence[ImageJob], prepared: dict, errors: dict, batch_size: int
) -> list[tuple[ImageJob, object, float]]:
    """One compiled call for the jobs (all of one group): (job, PIL image or error text, seconds per image)."""
    parts, failed = [], []
    for job in jobs:
        line = job.line
        if line not in prepared and line not in errors:
            request = job.request
            try:
                prepared[line] = pipe.prepare(request.settings, request.init_image, request.mask)
            except _LINE_ERRORS as e:
                errors[line] = _message(e)
        if line in errors:
            failed.append((job, errors[line], 0.0))
        else:
            parts.append(job)
    if not parts:
        return failed
    batch = generation.concatenate([prepared[job.line].batch.select([job.index]) for job in parts])
    start = time.perf_counter()
    first = prepared[parts[0].line]
    pixels = pipe.sample(batch, first.static, pad_to=batch_size, loras=first.loras)
    seconds = (time.perf_counter() - start) / len(parts)
    made = [(job, prepared[job.line].finish(pixels[i : i + 1])[0], seconds) for i, job in enumerate(parts)]
    return made + failed


def _bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="images", unit="image", file=sys.stderr, smoothing=0.1)


def _advance(bar, n: int) -> None:
    if bar is not None:
        bar.update(n)
