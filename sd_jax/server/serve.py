"""scripts/serve.py's work: check the flags, load the model, start the worker, serve with uvicorn.

Every user mistake (a malformed --api_auth, a missing folder or model, a port out of range) is a one-line
`error: ...` before the model loads. `Running` starts a server on a thread of this process (tests, benchmarks).
"""

from __future__ import annotations

import socket
import sys
import threading
import time

from sd_jax import cli


def _check_flags(flags_) -> dict[str, str] | None:
    from pathlib import Path

    from sd_jax.server.app import parse_auth

    if not 0 <= flags_.port <= 65535:
        cli.fail(f"--port must be in [0, 65535], got {flags_.port}")
    for name in ("max_body_mb", "max_steps", "max_images", "max_side", "micro_batch"):
        if flags_[name].value < 1:
            cli.fail(f"--{name} must be a positive integer, got {flags_[name].value}")
    if flags_.batch_size is not None and flags_.batch_size < 1:
        cli.fail(f"--batch_size must be a positive integer, got {flags_.batch_size}")
    for key in ("lora_dir", "embeddings_dir"):
        if flags_[key].value is not None and not Path(flags_[key].value).is_dir():
            cli.fail(f"--{key} {flags_[key].value}: no such folder")
    auth = cli.run_or_exit(parse_auth, flags_.api_auth) if flags_.api_auth else None
    if auth is None and flags_.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: serving on {flags_.host} without --api_auth: anyone who reaches it can use it", file=sys.stderr
        )
    return auth


def main(flags_) -> None:
    """Checks the flags, loads the model and serves until interrupted."""
    from importlib.metadata import PackageNotFoundError, version

    cli.quiet_logs()
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        cli.fail('the server needs FastAPI and uvicorn: pip install ".[server]"')

    from sd_jax.loading import load
    from sd_jax.server.a1111 import Limits
    from sd_jax.server.app import Config, create_app
    from sd_jax.server.models import ModelStore
    from sd_jax.server.worker import Worker

    auth = _check_flags(flags_)
    if flags_.watermark:
        from sd_jax import watermark

        cli.run_or_exit(watermark.check_available)
    store = cli.run_or_exit(ModelStore, flags_.models_dir, flags_.model)
    with socket.socket(socket.AF_INET6 if ":" in flags_.host else socket.AF_INET) as probe:
        try:  # a taken port is a one-line error before the model loads
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((flags_.host, flags_.port))
        except OSError as e:
            cli.fail(f"cannot listen on {flags_.host}:{flags_.port}: {e.strerror}")
    cli.use_compile_cache(flags_.compile_cache)

    def load_entry(entry):
        return load(
            entry.source,
            flags_.dtype,
            micro_batch=flags_.micro_batch,
            lora_dir=flags_.lora_dir,
            embeddings_dir=flags_.embeddings_dir,
        )

    print(f"loading {store.initial.title}", file=sys.stderr)
    pipe = cli.run_or_exit(load_entry, store.initial)
    worker = Worker(store, dtype=flags_.dtype, batch_size=flags_.batch_size, load=load_entry, pipe=pipe)
    try:
        sd_jax_version = version("sd_jax")
    except PackageNotFoundError:
        sd_jax_version = "unknown"
    limits = Limits(max_steps=flags_.max_steps, max_images=flags_.max_images, max_side=flags_.max_side)
    config = Config(
        auth=auth,
        max_body=flags_.max_body_mb << 20,
        limits=limits,
        watermark=flags_.watermark,
        version=f"sd_jax {sd_jax_version}",
    )
    app = create_app(worker, config)
    print(f"serving on http://{flags_.host}:{flags_.port}/ (AUTOMATIC1111's API under /sdapi/v1)", file=sys.stderr)
    uvicorn.run(app, host=flags_.host, port=flags_.port, log_level="warning")
    worker.close()


class Running:
    """A server on a thread of this process, on a free port of 127.0.0.1 (tests, benchmarks).

    with Running(create_app(worker)) as server:
        requests.post(server.url + "/sdapi/v1/txt2img", json={...})
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.app = app
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> Running:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
