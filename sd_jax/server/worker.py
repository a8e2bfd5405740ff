"""The server's generation worker: one thread owns the model; requests queue, and their images share device batches.

    worker = Worker(store, dtype="float32")
    future = worker.submit(Request(settings))          # a concurrent.futures.Future of a `Result`
    worker.progress()                                   # what GET /sdapi/v1/progress reports
    worker.interrupt()                                  # the requests being generated stop; the queue goes on

Each request is prepared (`StableDiffusionPipeline.prepare`: prompts, start, keys, noise) when the worker takes it.
Every call then serves the oldest request with images left, filled up to `batch_size` images with the images of
other waiting requests that need the same compiled program and weights (`Prepared.group_key`): requests sharing a
size, sampler and prompt-length bucket share device batches, whatever their prompts, seeds, steps or guidance. The
call size is fixed (a multiple of devices x micro-batch), so a group compiles once. An image is the same as the
Python API makes for its settings and seed: it depends only on its own request, never on its neighbours.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import itertools
import queue
import threading
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from sd_jax import generation, infotext
from sd_jax.server.models import ModelEntry, ModelStore
from sd_jax.settings import GenerationSettings


class RequestError(ValueError):
    """A request the model cannot make (found only once the model sees it: a prompt's LoRA, an image's size)."""


class _Stop(Exception):
    """Raised in the running program's progress callback to abort the call (interrupt or skip)."""


@dataclasses.dataclass
class Request:
    """One generation request: settings, input image and mask, and the model (None: the current default)."""

    settings: GenerationSettings
    image: Image.Image | None = None
    mask: Image.Image | np.ndarray | None = None
    model: ModelEntry | None = None


@dataclasses.dataclass
class Result:
    """A request's images with their seeds and PNG texts (`infotext.image_texts`); `interrupted`: it was stopped
    and holds only the images made before."""

    settings: GenerationSettings
    images: list[Image.Image]
    seeds: list[int]
    texts: list[dict[str, str]]
    model: ModelEntry
    family: str  # the model's `ModelConfig.family` (its watermark)
    is_inpainting: bool
    interrupted: bool = False


@dataclasses.dataclass
class _Job:
    request: Request
    future: concurrent.futures.Future
    number: int
    model: ModelEntry | None = None
    prepared: object = None  # `pipeline.Prepared` once the model has seen it
    todo: list[int] = dataclasses.field(default_factory=list)  # rows not yet made
    made: dict[int, Image.Image] = dataclasses.field(default_factory=dict)
    started: bool = False
    interrupted: bool = False


@dataclasses.dataclass
class _Switch:
    entry: ModelEntry
    future: concurrent.futures.Future


@dataclasses.dataclass
class _State:
    """What GET /progress reports (AUTOMATIC1111's `state`)."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    job_timestamp: str = "0"
    busy_since: float | None = None
    interrupted: bool = False
    skipped: bool = False


class Worker:
    """Owns the loaded pipeline and runs every request on one thread (see the module docstring)."""

    def __init__(
        self,
        store: ModelStore,
        *,
        dtype: str = "float32",
        batch_size: int | None = None,
        load: Callable[[ModelEntry], object] | None = None,
        pipe=None,
    ):
        """Args:
        store: the models requests may name; the worker starts with `store.initial`.
        dtype: the parameter and compute dtype models load with (and the images' metadata names).
        batch_size: images per compiled call (rounded up to a multiple of devices x micro-batch; default: one
          per device and micro-batch).
        load: `entry -> pipeline` (default: `sd_jax.load(entry.source, dtype)`).
        pipe: the initial model's pipeline, already loaded (else it is loaded on the worker thread)."""
        self.store = store
        self.dtype = dtype
        self._load = load or (lambda entry: _load(entry, dtype))
        self._batch_size = batch_size
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._state = _State()
        self._numbers = itertools.count()
        self._jobs: list[_Job] = []  # taken from the inbox, not finished, oldest first
        self._running: list[_Job] = []  # the jobs of the call in progress
        self._stop_call: str | None = None  # "interrupt" or "skip": what the running call's callback raises for
        self._closed = False
        self.entry = store.initial  # the model of requests that name none
        self._loaded = store.initial  # the model in memory
        self.pipe = _confined(pipe)
        self.calls = 0  # compiled calls made (for tests and benchmarks)
        self.images = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd_jax-worker", daemon=True)
        self._thread.start()

    # -- the HTTP side ----------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> concurrent.futures.Future:
        """Queues a request; the future gives its `Result`, or raises `RequestError` (its own fault) or another
        exception (the server's)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(_Job(request, future, next(self._numbers)))
        return future

    def switch_model(self, entry: ModelEntry) -> concurrent.futures.Future:
        """Makes `entry` the model of requests that name none, once the requests queued before are made; the future
        is done when it is loaded."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(_Switch(entry, future))
        return future

    @property
    def native_size(self) -> int | None:
        """The loaded model's native image side in pixels (None while none is loaded)."""
        pipe = self.pipe
        return None if pipe is None else pipe.native_size

    def lora_names(self) -> list[str]:
        """The names of the LoRA folder's files (what `<lora:NAME:WEIGHT>` may name)."""
        pipe = self.pipe
        return [] if pipe is None else sorted(pipe.loras.names())

    def embedding_names(self) -> list[str]:
        """The names of the textual-inversion embeddings prompts may use."""
        pipe = self.pipe
        if pipe is None or pipe.prompts.embeddings is None:
            return []
        return sorted(pipe.prompts.embeddings.scan())

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Waits until the initial model is loaded."""
        return self._ready.wait(timeout)

    def interrupt(self) -> None:
        """Stops the requests being generated: each returns the images made before; queued requests go on."""
        with self._lock:
            for job in self._jobs:
                if job.started:
                    job.interrupted = True
            if self._running:
                self._stop_call = "interrupt"
            self._state.interrupted = bool(self._running) or self._state.interrupted

    def skip(self) -> None:
        """Drops the images of the call in progress; their requests go on with their other images."""
        with self._lock:
            if self._running:
                self._stop_call = "skip"
                self._state.skipped = True

    def progress(self) -> dict:
        """A snapshot of the state: job, job_count, job_no, sampling_step, sampling_steps, job_timestamp,
        interrupted, skipped, queued (requests waiting), busy_seconds."""
        with self._lock:
            state = dataclasses.asdict(self._state)
            since = state.pop("busy_since")
            state["busy_seconds"] = 0.0 if since is None else time.monotonic() - since
            state["queued"] = self._inbox.qsize() + sum(1 for job in self._jobs if not job.started)
        return state

    def close(self) -> None:
        self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout=60)

    # -- the worker thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.pipe is None:
                self.pipe = _confined(self._load(self.entry))
        finally:
            self._ready.set()
        while not self._closed:
            if not self._take(block=not self._jobs):
                break
            job = self._next_job()
            if job is None:
                continue
            self._call(job)

    def _take(self, block: bool) -> bool:
        """Moves what the inbox holds into the job list (waiting for one item when `block`); False on close."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if item is None:
                return False
            if isinstance(item, _Switch):
                self._switch(item)
            else:
                item.model = item.request.model or self.entry
                with self._lock:
                    self._jobs.append(item)
            block = False

    def _switch(self, switch: _Switch) -> None:
        # Requests queued before the switch keep the model they were queued for; the next need of another model
        # loads it (`_next_job`). The switch itself only waits for the model to be loaded.
        try:
            self._use(switch.entry)
            self.entry = switch.entry
            switch.future.set_result(switch.entry)
        except Exception as e:  # noqa: BLE001 - the client hears of it; the worker keeps serving
            switch.future.set_exception(e)

    def _use(self, entry: ModelEntry) -> None:
        """Loads `entry` in place of the current model (one model in memory); on failure the old one is reloaded."""
        if self.pipe is not None and self._loaded == entry:
            return
        previous = self._loaded
        self.pipe = None
        gc.collect()
        try:
            self.pipe = _confined(self._load(entry))
            self._loaded = entry
        except Exception:
            self.pipe = _confined(self._load(previous))
            raise

    def _next_job(self) -> _Job | None:
        """The oldest job with images left on the loaded model, every job of that model prepared (so that the call
        can take their images too); when only other models' jobs are left, the oldest one's model is loaded first.
        None if no job could be prepared."""
        if self._jobs and not any(job.model == self._loaded for job in self._jobs):
            first = self._jobs[0]
            try:
                self._use(first.model)
            except Exception as e:  # noqa: BLE001 - that job fails; the others go on
                self._finish(first, error=e)
                return None
        for job in list(self._jobs):
            if job.model == self._loaded and job.prepared is None:
                self._prepare(job)
        return next((job for job in self._jobs if job.model == self._loaded and job.prepared is not None), None)

    def _prepare(self, job: _Job) -> bool:
        request = job.request
        try:
            job.prepared = self.pipe.prepare(request.settings, request.image, request.mask)
        except (ValueError, OSError) as e:
            self._finish(job, error=RequestError(" ".join(str(e).split())))
            return False
        except Exception as e:  # noqa: BLE001
            self._finish(job, error=e)
            return False
        job.todo = list(range(job.prepared.batch.size))
        return True

    def _call(self, first: _Job) -> None:
        """One compiled call: `first`'s next images, then other prepared jobs' of the same group, oldest first."""
        per_call = self.pipe.mesh.size * self.pipe.micro_batch
        size = per_call if self._batch_size is None else -(-max(1, self._batch_size) // per_call) * per_call
        key = first.prepared.group_key
        parts: list[tuple[_Job, list[int]]] = []
        room = size
        for job in self._jobs:
            if room == 0:
                break
            if job.model != self._loaded:
                continue
            if job is not first and (job.prepared is None or job.prepared.group_key != key):
                continue
            rows = job.todo[:room]
            if rows:
                parts.append((job, rows))
                room -= len(rows)
        with self._lock:
            for job, _ in parts:
                job.started = True
            self._running = [job for job, _ in parts]
            self._stop_call = None
            state = self._state
            if state.busy_since is None:
                state.busy_since = time.monotonic()
                state.job_timestamp = time.strftime("%Y%m%d%H%M%S")
                state.job_no = state.job_count = 0
                state.interrupted = state.skipped = False
            state.job = first.request.settings.mode
            state.job_count = state.job_no + self._calls_left(size)
            state.sampling_step, state.sampling_steps = 0, int(max(first.request.settings.steps, 1))
        batch = generation.concatenate([job.prepared.batch.select(rows) for job, rows in parts])
        prepared = first.prepared
        pixels, stopped, error = None, None, None
        try:
            pixels = self.pipe.sample(batch, prepared.static, self._on_step, pad_to=size, loras=prepared.loras)
        except Exception as e:  # noqa: BLE001 - an aborted call surfaces as the runtime's error
            with self._lock:
                stopped = self._stop_call
            if stopped is None:
                error = e
        self.calls += 1
        with self._lock:
            self._running = []
            self._state.job_no += 1
        i = 0
        for job, rows in parts:
            for row in rows:
                job.todo.remove(row)
                if pixels is not None:
                    job.made[row] = job.prepared.finish(pixels[i : i + 1])[0]
                    self.images += 1
                i += 1
            if error is not None:
                self._finish(job, error=error)
            elif job.interrupted or not job.todo:
                self._finish(job)
        with self._lock:
            if not self._jobs:
                self._state = _State(job_timestamp=self._state.job_timestamp)

    def _calls_left(self, size: int) -> int:
        rows: dict[tuple, int] = {}
        for job in self._jobs:
            key = job.prepared.group_key if job.prepared is not None else ("unprepared", job.number)
            rows[key] = rows.get(key, 0) + (len(job.todo) if job.prepared is not None else 1)
        return sum(-(-n // size) for n in rows.values())

    def _on_step(self, done: int, total: int) -> None:
        with self._lock:
            self._state.sampling_step, self._state.sampling_steps = done, total
            stop = self._stop_call
        if stop is not None:
            raise _Stop(stop)

    def _finish(self, job: _Job, *, error: Exception | None = None) -> None:
        with self._lock:
            if job in self._jobs:
                self._jobs.remove(job)
        if error is not None:
            job.future.set_exception(error)
            return
        try:
            job.future.set_result(self._result(job))
        except Exception as e:  # noqa: BLE001
            job.future.set_exception(e)

    def _result(self, job: _Job) -> Result:
        settings = job.request.settings
        rows = sorted(job.made)
        images = [job.made[r] for r in rows]
        seeds = [settings.seed + r for r in rows]  # image r of a request has seed + r (prompt-major)
        texts = (
            infotext.image_texts(self.pipe, settings, images, seeds, model=job.model.source, dtype=self.dtype)
            if images
            else []
        )
        return Result(
            settings=settings,
            images=images,
            seeds=seeds,
            texts=texts,
            model=job.model,
            family=self.pipe.config.family,
            is_inpainting=self.pipe.config.is_inpainting,
            interrupted=job.interrupted,
        )


def _confined(pipe):
    """The pipeline with its prompts' `<lora:...>` tags confined to its LoRA folder's names: no request names a file
    path of the server's."""
    if pipe is not None:
        pipe.loras.names_only = True
    return pipe


def _load(entry: ModelEntry, dtype: str):
    from sd_jax.loading import load

    return load(entry.source, dtype)
