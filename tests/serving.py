"""A live sd_jax server on 127.0.0.1 for the server tests: the tiny random-weight model, started on a thread."""

from __future__ import annotations

import contextlib

import sd_jax
from sd_jax.server.app import Config, create_app
from sd_jax.server.models import ModelStore
from sd_jax.server.serve import Running
from sd_jax.server.worker import Worker

MODEL = "random:tiny"


@contextlib.contextmanager
def tiny_server(pipe=None, *, models_dir=None, **config):
    """Yields (server, worker, pipe): a server of `random:tiny` (or `pipe`) at `server.url`; `config`: `Config`
    fields (watermark off unless given)."""
    pipe = pipe if pipe is not None else sd_jax.load(MODEL)
    worker = Worker(ModelStore(models_dir, MODEL), pipe=pipe, load=lambda entry: sd_jax.load(entry.source))
    config.setdefault("watermark", False)
    try:
        with Running(create_app(worker, Config(**config))) as server:
            yield server, worker, pipe
    finally:
        worker.close()
