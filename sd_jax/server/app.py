"""The HTTP server: AUTOMATIC1111's `/sdapi/v1` routes and the page at `/`, over one `Worker`.

    app = create_app(worker, Config(auth={"user": "secret"}))
    uvicorn.run(app, host="127.0.0.1", port=7860)

A thin shell: a request body becomes sd_jax settings (`a1111`), the worker makes the images, and the result becomes
AUTOMATIC1111's response. The event loop never runs a model: decoding and encoding images run in threads, and a
request waits on its future while others are answered (progress, interrupt, more requests for the same batch).
Every route takes HTTP basic auth when the server has credentials; a request body is at most `max_body` bytes; a
request can name no file: images come as base64 and models by name from the server's list.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import secrets
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response

from sd_jax.server import a1111
from sd_jax.server.a1111 import FieldError, Img2ImgBody, Limits, Options, Txt2ImgBody
from sd_jax.server.worker import RequestError, Worker

STATIC = Path(__file__).parent / "static"


@dataclasses.dataclass
class Config:
    """What the server allows and adds (scripts/serve.py's flags)."""

    auth: dict[str, str] | None = None  # user -> password (HTTP basic on every route); None: open
    max_body: int = 64 << 20  # bytes of one request body
    limits: Limits = dataclasses.field(default_factory=Limits)
    watermark: bool = True  # the model family's invisible watermark on every image big enough to carry it
    version: str = "sd_jax"


def parse_auth(text: str) -> dict[str, str]:
    """`user:pass[,user:pass]` (AUTOMATIC1111's --api-auth) as {user: password}; ValueError if malformed."""
    users = {}
    for part in text.split(","):
        user, sep, password = part.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api_auth takes user:password[,user:password], got {part.strip()!r}")
        users[user] = password
    return users


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    """A one-line `error`, and FastAPI's `detail` list naming the field (what AUTOMATIC1111's clients parse)."""
    body: dict[str, Any] = {"error": f"{field}: {message}" if field and field != "body" else message}
    if field is not None:
        loc = ["body"] if field == "body" else ["body", field]
        body["detail"] = [{"loc": loc, "msg": message, "type": "value_error"}]
    else:
        body["detail"] = message
    return JSONResponse(body, status_code=status, headers=headers)


class _Guard:
    """ASGI middleware: HTTP basic auth on every request, and the body size limit (read before any route runs)."""

    def __init__(self, app, auth: dict[str, str] | None, max_body: int):
        self.app = app
        self.auth = auth
        self.max_body = max_body

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        value = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, encoded = value.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = self.auth.get(user)
        # Compare in constant time, and as long for an unknown user as for a known one.
        return secrets.compare_digest(password.encode(), (expected or secrets.token_hex(16)).encode()) and (
            expected is not None
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.auth is not None and not self._authorized(headers):
            response = _error(401, "not authenticated", headers={"WWW-Authenticate": 'Basic realm="sd_jax"'})
            return await response(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _error(413, f"the request body is over the server's {self.max_body} bytes")(
                scope, receive, send
            )
        chunks, size = [], 0
        while True:  # read the whole body first: a chunked body over the limit is refused too
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await _error(413, f"the request body is over the server's {self.max_body} bytes")(
                    scope, receive, send
                )
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def create_app(worker: Worker, config: Config | None = None) -> FastAPI:
    """The FastAPI application over a running worker."""
    config = config or Config()
    app = FastAPI(title="sd_jax", description="AUTOMATIC1111's web API, served by sd_jax.", version=config.version)
    options = Options()
    limits = config.limits

    @app.exception_handler(FieldError)
    async def field_error(request: Request, e: FieldError):
        return _error(422, e.message, e.field)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        return _error(422, str(e), "body")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = [{k: v for k, v in error.items() if k in ("loc", "msg", "type")} for error in e.errors()]
        first = errors[0] if errors else {"loc": ["body"], "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"][1:]) or "body"
        return JSONResponse({"error": f"{where}: {first['msg']}", "detail": jsonable_encoder(errors)}, status_code=422)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return JSONResponse({"error": type(e).__name__, "detail": "", "body": "", "errors": str(e)}, status_code=500)

    # -- generation ----------------------------------------------------------------------------------------------
    async def generate(body: Txt2ImgBody, build) -> dict:
        request = await run_in_threadpool(build, body, options, limits)
        checkpoint = (body.override_settings or {}).get("sd_model_checkpoint")
        if isinstance(checkpoint, str):
            try:  # as AUTOMATIC1111: a name that matches no model is dropped
                request.model = worker.store.find(checkpoint)
            except KeyError:
                pass
        hires_scale = a1111.check_hires(body, limits) if type(body) is Txt2ImgBody else None
        subseed = body.subseed if body.subseed != -1 else secrets.randbelow(2**32 - 1)
        result = await asyncio.wrap_future(worker.submit(request))
        timestamp = worker.progress()["job_timestamp"]
        hires = None
        if hires_scale is not None and result.images and not result.interrupted:
            second = a1111.hires_requests(body, result, hires_scale, options)
            done = await asyncio.gather(*(asyncio.wrap_future(worker.submit(r)) for r in second))
            hires = dataclasses.replace(
                done[0],
                images=[image for r in done for image in r.images],
                seeds=[seed for r in done for seed in r.seeds],
                texts=[text for r in done for text in r.texts],
                interrupted=any(r.interrupted for r in done),
            )
        return await run_in_threadpool(_respond, result, body, subseed, timestamp, hires)

    def _respond(result, body: Txt2ImgBody, subseed: int, timestamp: str, hires=None) -> dict:
        payload = None
        if config.watermark:
            from sd_jax.watermark import PAYLOADS

            payload = PAYLOADS.get(result.family)
        images = []
        final = hires or result
        if body.send_images:
            images = [a1111.encode_png(im, t, payload) for im, t in zip(final.images, final.texts, strict=True)]
        info = a1111.info(result, body, subseed=subseed, job_timestamp=timestamp, version=config.version, hires=hires)
        return {"images": images, "parameters": a1111.parameters(body), "info": json.dumps(info)}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgBody):
        return await generate(body, a1111.txt2img_request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgBody):
        return await generate(body, a1111.img2img_request)

    # -- lists and options -----------------------------------------------------------------------------------------
    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return a1111.samplers()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return a1111.schedulers()

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return await run_in_threadpool(lambda: [entry.a1111() for entry in worker.store.entries()])

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        return None  # the list is read from the folder at every call

    @app.get("/sdapi/v1/sd-vae")
    async def sd_vae():
        return []

    @app.get("/sdapi/v1/prompt-styles")
    async def prompt_styles():
        return []

    @app.get("/sdapi/v1/loras")
    async def loras():
        names = await run_in_threadpool(worker.lora_names)
        return [{"name": n, "alias": n, "path": n, "metadata": {}} for n in names]  # names, never server paths

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        names = await run_in_threadpool(worker.embedding_names)
        return {"loaded": {n: {} for n in names}, "skipped": {}}

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]

    def current_options() -> dict:
        entry = worker.entry
        return {
            "sd_model_checkpoint": entry.title,
            "sd_checkpoint_hash": entry.sha256 or "",
            "CLIP_stop_at_last_layers": float(options.clip_skip),
            "eta_ddim": options.eta_ddim,
            "eta_ancestral": 1.0,
            "samples_format": "png",
            "enable_pnginfo": True,
            "sd_vae": "Automatic",
            "face_restoration": False,
            "tiling": False,
            "img2img_background_color": "#ffffff",
            "inpainting_mask_weight": 1.0,
            "initial_noise_multiplier": 1.0,
            "sd_jax_native_size": worker.native_size,
        }

    @app.get("/sdapi/v1/options")
    async def get_options():
        return await run_in_threadpool(current_options)

    @app.post("/sdapi/v1/options")
    async def set_options(body: dict[str, Any]):
        current = await run_in_threadpool(current_options)
        settable = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "eta_ddim")
        for key, value in body.items():  # every key is checked before any is applied
            if key not in current:
                raise FieldError(key, "unknown option")
            if key not in settable and value != current[key]:
                raise FieldError(key, f"sd_jax keeps this option at {current[key]!r}")
        entry = None
        if "sd_model_checkpoint" in body:
            try:
                entry = worker.store.find(str(body["sd_model_checkpoint"]))
            except KeyError as e:
                raise FieldError("sd_model_checkpoint", str(e.args[0])) from None
        clip_skip = body.get("CLIP_stop_at_last_layers", options.clip_skip)
        eta_ddim = body.get("eta_ddim", options.eta_ddim)
        a1111.check_options(clip_skip, eta_ddim)
        if entry is not None and entry != worker.entry:
            await asyncio.wrap_future(worker.switch_model(entry))
        options.clip_skip, options.eta_ddim = int(clip_skip), float(eta_ddim)
        return None

    # -- the running job -------------------------------------------------------------------------------------------
    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        state = worker.progress()
        elapsed = state.pop("busy_seconds")
        state.pop("queued")
        state["stopping_generation"] = False
        if not state["job_count"]:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        p = 0.01 + state["job_no"] / state["job_count"]
        if state["sampling_steps"]:
            p += state["sampling_step"] / state["sampling_steps"] / state["job_count"]
        return {
            "progress": min(p, 1.0),
            "eta_relative": elapsed / p - elapsed,
            "state": state,
            "current_image": None,
            "textinfo": None,
        }

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        worker.skip()
        return None

    @app.post("/sdapi/v1/png-info")
    async def png_info(body: dict[str, Any]):
        return await run_in_threadpool(a1111.png_info, body.get("image"), limits.max_image_pixels)

    # -- the page --------------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    app.add_middleware(_Guard, auth=config.auth, max_body=config.max_body)
    return app
