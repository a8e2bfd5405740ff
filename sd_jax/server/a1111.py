"""AUTOMATIC1111's web API (`/sdapi/v1`) in sd_jax's terms: request bodies to `GenerationSettings`, results to its
responses, and its sampler, scheduler and PNG-info answers.

The request bodies are AUTOMATIC1111's (1.9/1.10) field for field, with its names, types and defaults; unknown
fields are ignored, as there. Where its behaviour is silent or lenient, sd_jax answers a 422 naming the field:
an unknown sampler or scheduler (AUTOMATIC1111 falls back to another), undecodable base64 (a 500 there), and
options sd_jax does not have (face restoration, tiling, latent upscalers, variation seeds, scripts, styles), which
would otherwise be ignored silently and give another image than the client asked for.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict

from sd_jax import infotext
from sd_jax.infotext import A1111_AUTOMATIC, A1111_SAMPLER_NAMES
from sd_jax.sampling.samplers import SAMPLERS
from sd_jax.server.worker import Request, Result
from sd_jax.settings import MAX_SEED, GenerationSettings

# AUTOMATIC1111's inpainting_fill values.
FILLS = {0: "fill", 1: "original", 2: "latent_noise", 3: "latent_nothing"}
# The schedulers sd_jax takes: (name, label) as AUTOMATIC1111 lists them, and sd_jax's schedule for each. "automatic"
# is each sampler's own default (`infotext.A1111_AUTOMATIC`); "uniform", "sgm_uniform" and "ddim" walk the model's
# own timesteps, as sd_jax's "default" does (see `infotext.A1111_SPACING_NAMES`).
SCHEDULERS = {
    "automatic": ("Automatic", None),
    "uniform": ("Uniform", "default"),
    "karras": ("Karras", "karras"),
    "exponential": ("Exponential", "exponential"),
    "sgm_uniform": ("SGM Uniform", "default"),
    "ddim": ("DDIM", "default"),
}
_SAMPLER_ALIASES = {
    "ddim": ["ddim"],
    "plms": ["plms"],
    "euler": ["k_euler"],
    "euler_a": ["k_euler_a", "k_euler_ancestral"],
    "heun": ["k_heun"],
    "lms": ["k_lms"],
    "dpm2": ["k_dpm_2"],
    "dpm2_a": ["k_dpm_2_a"],
    "dpmpp_2s_a": ["k_dpmpp_2s_a"],
    "dpmpp_2m": ["k_dpmpp_2m"],
    "dpmpp_sde": ["k_dpmpp_sde"],
    "dpmpp_2m_sde": ["k_dpmpp_2m_sde"],
    "unipc": ["unipc"],
}
# sd_jax field -> the request field that sets it (for the error of a field that validation rejects).
_FIELD_NAMES = {
    "guidance_scale": "cfg_scale",
    "num_images": "batch_size",
    "strength": "denoising_strength",
    "mask_blur": "mask_blur",
    "padding": "inpaint_full_res_padding",
    "clip_skip": "override_settings",
}


class FieldError(ValueError):
    """A request field sd_jax cannot take: answered 422 with the field's name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Limits(BaseModel):
    """What one request may ask for (the server's flags)."""

    max_steps: int = 150
    max_images: int = 16  # batch_size * n_iter
    max_side: int = 2048  # width and height, pixels
    max_image_pixels: int = 4096 * 4096  # a decoded input image


class Txt2ImgBody(BaseModel):
    """POST /sdapi/v1/txt2img (AUTOMATIC1111's StableDiffusionTxt2ImgProcessingAPI)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str | None = None
    sampler_index: str = "Euler"
    script_name: str | None = None
    script_args: list = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    infotext: str | None = None


class Img2ImgBody(Txt2ImgBody):
    """POST /sdapi/v1/img2img (AUTOMATIC1111's StableDiffusionImg2ImgProcessingAPI)."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False
    denoising_strength: float | None = 0.75


class Options(BaseModel):
    """The server-wide options of GET/POST /sdapi/v1/options that requests use."""

    clip_skip: int = 1  # CLIP_stop_at_last_layers
    eta_ddim: float = 0.0


# ---------------------------------------------------------------------------------------------------------------
# Requests


def sampler_and_schedule(sampler_name: str | None, sampler_index: str, scheduler: str | None) -> tuple[str, str]:
    """sd_jax's (sampler, schedule) for a request's sampler_name (or sampler_index) and scheduler.

    As AUTOMATIC1111 1.9+: a name may carry a schedule ("DPM++ 2M Karras"); a null or "Automatic" scheduler is the
    sampler's own default. Raises FieldError for a sampler or scheduler sd_jax does not have."""
    field = "sampler_name" if sampler_name else "sampler_index"
    name = sampler_name or sampler_index
    try:
        sampler, from_name = infotext.sampler_from_a1111(name)
    except ValueError as e:
        raise FieldError(field, str(e)) from None
    if scheduler is not None and scheduler.strip():
        key = scheduler.strip().lower().replace(" ", "_")
        labels = {label.lower().replace(" ", "_"): name for name, (label, _) in SCHEDULERS.items()}
        key = labels.get(key, key)
        if key not in SCHEDULERS:
            known = ", ".join(f"{n} ({label})" for n, (label, _) in SCHEDULERS.items())
            raise FieldError("scheduler", f"unknown scheduler {scheduler!r}; sd_jax has: {known}")
        schedule = SCHEDULERS[key][1]
        if schedule is not None:
            return sampler, schedule
    elif from_name != "default":  # "DPM++ 2M Karras": the name's schedule
        return sampler, from_name
    return sampler, A1111_AUTOMATIC.get(sampler, "default")


def decode_image(data: Any, field: str, max_pixels: int, *, rotate: bool = True) -> Image.Image:
    """A base64 image (plain or a `data:image/...;base64,` URL) as a PIL image, EXIF-rotated unless `rotate` is
    False (which keeps a PNG's `text`); FieldError for anything else: a URL or path (never fetched or opened), bad
    base64, not an image, more than `max_pixels`."""
    if not isinstance(data, str) or not data.strip():
        raise FieldError(field, "expected a base64-encoded image")
    data = data.strip()
    if data.startswith("data:image/") and "," in data:
        data = data.split(",", 1)[1]
    elif data.startswith(("http://", "https://", "file:", "/", ".")):
        raise FieldError(field, "images are sent as base64; URLs and paths are not read")
    try:
        raw = base64.b64decode(data)
    except (binascii.Error, ValueError):
        raise FieldError(field, "invalid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if width * height > max_pixels:
            raise FieldError(field, f"the image is {width}x{height}, more than the server's {max_pixels} pixels")
        image.load()
        return ImageOps.exif_transpose(image) if rotate else image
    except FieldError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError):
        raise FieldError(field, "not a readable image") from None


def _rgb(image: Image.Image) -> Image.Image:
    """AUTOMATIC1111's init image: transparent pixels flattened onto white, then RGB."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _mask(image: Image.Image, invert: bool) -> Image.Image:
    """AUTOMATIC1111's mask: a transparent image's alpha (opaque = repaint), else its luminance; white repaints."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            image = alpha.point(lambda v: 255 if v > 128 else 0)
    mask = image.convert("L")
    return ImageOps.invert(mask) if invert else mask


def _unsupported(field: str, value: Any, default: Any, what: str) -> None:
    if value is not None and value != default:
        raise FieldError(field, f"sd_jax has no {what}; send {json.dumps(default)} or leave it out")


def _check_unsupported(body: Txt2ImgBody) -> None:
    _unsupported("restore_faces", body.restore_faces, False, "face restoration")
    _unsupported("tiling", body.tiling, False, "tiling")
    _unsupported("subseed_strength", body.subseed_strength, 0, "variation seeds")
    if body.seed_resize_from_h > 0 and body.seed_resize_from_w > 0:
        if (body.seed_resize_from_w, body.seed_resize_from_h) != (body.width, body.height):
            raise FieldError("seed_resize_from_w", "sd_jax has no seed resizing")
    _unsupported("styles", body.styles or [], [], "saved styles")
    _unsupported("script_name", body.script_name, None, "scripts")
    _unsupported("alwayson_scripts", body.alwayson_scripts or {}, {}, "scripts")
    _unsupported("refiner_checkpoint", body.refiner_checkpoint, None, "refiner")
    for field, default in (("s_churn", 0.0), ("s_tmin", 0.0), ("s_noise", 1.0), ("s_min_uncond", 0.0)):
        _unsupported(field, getattr(body, field), default, f"{field} (sampler noise options)")
    if body.s_tmax not in (None, 0.0, float("inf")):
        raise FieldError("s_tmax", "sd_jax has no s_tmax (sampler noise options)")
    if isinstance(body, Img2ImgBody):
        _unsupported("initial_noise_multiplier", body.initial_noise_multiplier, 1.0, "noise multiplier")
        _unsupported("latent_mask", body.latent_mask, None, "separate latent mask")


def _check_limits(body: Txt2ImgBody, limits: Limits) -> int:
    for side in ("width", "height"):
        value = getattr(body, side)
        if value <= 0 or value % 8:
            raise FieldError(side, f"must be a positive multiple of 8, got {value}")
        if value > limits.max_side:
            raise FieldError(side, f"must be at most {limits.max_side} on this server, got {value}")
    if not 1 <= body.steps <= limits.max_steps:
        raise FieldError("steps", f"must be between 1 and {limits.max_steps} on this server, got {body.steps}")
    for field in ("batch_size", "n_iter"):
        if getattr(body, field) < 1:
            raise FieldError(field, f"must be at least 1, got {getattr(body, field)}")
    n = body.batch_size * body.n_iter
    if n > limits.max_images:
        raise FieldError("batch_size", f"batch_size x n_iter must be at most {limits.max_images} here, got {n}")
    return n


def _seed(seed: int, n: int) -> int:
    if seed == -1:
        return random.randrange(MAX_SEED - n + 2)
    if not 0 <= seed <= MAX_SEED - n + 1:
        raise FieldError("seed", f"must be -1 (random) or in [0, 2**32 - images], got {seed}")
    return seed


def _overrides(body: Txt2ImgBody, options: Options) -> tuple[int, float]:
    overrides = body.override_settings or {}
    clip_skip = overrides.get("CLIP_stop_at_last_layers", options.clip_skip)
    eta_ddim = overrides.get("eta_ddim", options.eta_ddim)
    check_options(clip_skip, eta_ddim, "override_settings")
    return int(clip_skip), float(eta_ddim)


def check_options(clip_skip: Any, eta_ddim: Any, field: str | None = None) -> None:
    """FieldError unless CLIP_stop_at_last_layers is a positive integer and eta_ddim is in [0, 1]."""
    if (
        isinstance(clip_skip, bool)
        or not isinstance(clip_skip, (int, float))
        or int(clip_skip) != clip_skip
        or clip_skip < 1
    ):
        message = f"CLIP_stop_at_last_layers must be a positive integer, got {clip_skip!r}"
        raise FieldError(field or "CLIP_stop_at_last_layers", message)
    if isinstance(eta_ddim, bool) or not isinstance(eta_ddim, (int, float)) or not 0 <= eta_ddim <= 1:
        raise FieldError(field or "eta_ddim", f"eta_ddim must be in [0, 1], got {eta_ddim!r}")


def _validated(settings: GenerationSettings) -> GenerationSettings:
    try:
        return settings.validate()
    except (ValueError, TypeError) as e:
        message = str(e)
        fields = [f for f in (*_FIELD_NAMES, "height", "width", "steps", "seed", "eta", "prompt") if f in message]
        field = _FIELD_NAMES.get(fields[0], fields[0]) if fields else "body"
        raise FieldError(field, message) from None


def _common(body: Txt2ImgBody, options: Options, limits: Limits) -> dict[str, Any]:
    """The settings every request has (after the checks every request gets; FieldError names the first bad field)."""
    _check_unsupported(body)
    n = _check_limits(body, limits)
    sampler, schedule = sampler_and_schedule(body.sampler_name, body.sampler_index, body.scheduler)
    clip_skip, eta_ddim = _overrides(body, options)
    return dict(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        steps=body.steps,
        guidance_scale=float(body.cfg_scale),
        sampler=sampler,
        schedule=schedule,
        eta=_eta(body, sampler, eta_ddim),
        seed=_seed(body.seed, n),
        num_images=n,
        clip_skip=clip_skip,
    )


def txt2img_request(body: Txt2ImgBody, options: Options, limits: Limits) -> Request:
    """The sd_jax request of a txt2img body (checks first; FieldError names the first bad field)."""
    common = _common(body, options, limits)
    settings = GenerationSettings(mode="txt2img", height=body.height, width=body.width, **common)
    return Request(_validated(settings))


HIRES_UPSCALERS = (None, "None", "Lanczos")  # the hires pass resizes pixels (Lanczos), as sd_jax's upscale mode


def check_hires(body: Txt2ImgBody, limits: Limits) -> float | None:
    """The hires fix's scale (None without `enable_hr`), its fields checked before the first pass runs.

    The second pass is sd_jax's upscale mode: a Lanczos resize of each first-pass image by `hr_scale` (or to
    `hr_resize_x` x `hr_resize_y`, which must keep the aspect), then img2img at `denoising_strength` for
    `hr_second_pass_steps` (0: `steps`), with the image's own seed."""
    if not body.enable_hr:
        return None
    if body.hr_upscaler not in HIRES_UPSCALERS:
        raise FieldError("hr_upscaler", f"sd_jax's hires pass resizes with Lanczos; got {body.hr_upscaler!r}")
    _unsupported("hr_checkpoint_name", body.hr_checkpoint_name, None, "second checkpoint for the hires pass")
    if body.denoising_strength is None or not 0 <= body.denoising_strength <= 1:
        raise FieldError("denoising_strength", "the hires pass needs a denoising_strength in [0, 1]")
    if body.hr_second_pass_steps < 0 or body.hr_second_pass_steps > limits.max_steps:
        raise FieldError("hr_second_pass_steps", f"must be between 0 and {limits.max_steps} on this server")
    scale = body.hr_scale
    if body.hr_resize_x or body.hr_resize_y:
        scales = {body.hr_resize_x / body.width if body.hr_resize_x else None}
        scales |= {body.hr_resize_y / body.height if body.hr_resize_y else None}
        scales.discard(None)
        if len(scales) != 1:
            raise FieldError("hr_resize_x", "sd_jax's hires pass keeps the aspect: give one of hr_resize_x/y or both")
        scale = scales.pop()
    if not 0 < scale or max(body.width, body.height) * scale > limits.max_side:
        raise FieldError("hr_scale", f"the hires size must be positive and at most {limits.max_side} on this server")
    return float(scale)


def hires_requests(body: Txt2ImgBody, first: Result, scale: float, options: Options) -> list[Request]:
    """The hires fix's second pass: one upscale request per first-pass image (seed and prompt its own)."""
    s = first.settings
    sampler, schedule = s.sampler, s.schedule
    if body.hr_sampler_name or body.hr_scheduler:
        sampler, schedule = sampler_and_schedule(body.hr_sampler_name or None, body.sampler_index, body.hr_scheduler)
        if not body.hr_sampler_name:
            sampler = s.sampler
    requests = []
    prompts = [p for p in s.prompts for _ in range(s.num_images)]
    negatives = [p for p in s.negative_prompts for _ in range(s.num_images)]
    for image, seed in zip(first.images, first.seeds, strict=True):
        settings = GenerationSettings(
            mode="upscale",
            prompt=body.hr_prompt or prompts[seed - s.seed],
            negative_prompt=body.hr_negative_prompt or negatives[seed - s.seed],
            steps=body.hr_second_pass_steps or s.steps,
            guidance_scale=s.guidance_scale,
            sampler=sampler,
            schedule=schedule,
            eta=s.eta if sampler == "ddim" else 0.0,
            seed=seed,
            clip_skip=s.clip_skip,
            strength=float(body.denoising_strength),
            scale=scale,
        )
        requests.append(Request(_validated(settings), image=image, model=first.model))
    return requests


def _eta(body: Txt2ImgBody, sampler: str, eta_ddim: float) -> float:
    """DDIM's eta (sd_jax's `eta`); the ancestral samplers keep their own (1, AUTOMATIC1111's eta_ancestral)."""
    if sampler != "ddim":
        return 0.0
    eta = eta_ddim if body.eta is None else body.eta
    if not 0 <= eta <= 1:
        raise FieldError("eta", f"must be in [0, 1], got {eta}")
    return float(eta)


def img2img_request(body: Img2ImgBody, options: Options, limits: Limits) -> Request:
    """The sd_jax request of an img2img body: img2img, or inpainting when it has a mask."""
    common = _common(body, options, limits)
    if not body.init_images:
        raise FieldError("init_images", "give one base64 image")
    if len(body.init_images) > 1:
        raise FieldError("init_images", "sd_jax takes one init image a request")
    strength = 0.75 if body.denoising_strength is None else body.denoising_strength
    if not 0 <= strength <= 1:
        raise FieldError("denoising_strength", f"must be in [0, 1], got {strength}")
    common["strength"] = float(strength)
    image = _rgb(decode_image(body.init_images[0], "init_images", limits.max_image_pixels))
    size = (body.width, body.height)
    if body.resize_mode != 0 and image.size != size:
        raise FieldError("resize_mode", "sd_jax resizes as resize_mode 0 (just resize); send 0")
    if not body.mask:
        settings = GenerationSettings(mode="img2img", height=body.height, width=body.width, **common)
        return Request(_validated(settings), image=image)

    mask = _mask(decode_image(body.mask, "mask", limits.max_image_pixels), bool(body.inpainting_mask_invert))
    if mask.size != image.size:
        raise FieldError(
            "mask", f"the mask is {mask.size[0]}x{mask.size[1]}, the image {image.size[0]}x{image.size[1]}"
        )
    blur = body.mask_blur
    if blur is None:
        if body.mask_blur_x != body.mask_blur_y:
            raise FieldError("mask_blur_x", "sd_jax blurs the mask by one radius: give mask_blur_x == mask_blur_y")
        blur = body.mask_blur_x
    if body.inpainting_fill not in FILLS:
        raise FieldError("inpainting_fill", f"must be one of {sorted(FILLS)}, got {body.inpainting_fill}")
    if mask.getextrema()[1] < 128:
        raise FieldError("mask", "the mask is empty: nothing to repaint (white marks the area to repaint)")
    inpaint = dict(mask_blur=float(blur), fill=FILLS[body.inpainting_fill], **common)
    if body.inpaint_full_res:  # "only masked": the mask's box at width x height, pasted back at the image's size
        settings = GenerationSettings(
            mode="inpaint",
            only_masked=True,
            padding=body.inpaint_full_res_padding,
            height=body.height,
            width=body.width,
            **inpaint,
        )
    else:  # "whole picture": the image and mask resized to width x height
        if image.size != size:
            image = image.resize(size, Image.Resampling.LANCZOS)
            mask = mask.resize(size, Image.Resampling.LANCZOS)
        settings = GenerationSettings(mode="inpaint", **inpaint)
    return Request(_validated(settings), image=image, mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Responses


def encode_png(image: Image.Image, texts: dict[str, str], watermark: bytes | None) -> str:
    """A generated image as AUTOMATIC1111's API returns it: base64 of a PNG carrying its infotext."""
    from sd_jax.images import png_info

    if watermark is not None:
        from sd_jax.watermark import add_watermark, watermark_fits

        if watermark_fits(image):
            image = add_watermark(image, watermark)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=png_info(texts))
    return base64.b64encode(out.getvalue()).decode("ascii")


def info(
    result: Result, body: Txt2ImgBody, *, subseed: int, job_timestamp: str, version: str, hires: Result | None = None
) -> dict:
    """AUTOMATIC1111's `info` object of a request's result (the response carries it as a JSON string); with the
    hires fix, `result` is the first pass and `hires` the second's images (one result holding them all)."""
    s = result.settings
    n = s.num_images * len(s.prompts)
    seeds = [s.seed + i for i in range(n)]
    prompts = [p for p in s.prompts for _ in range(s.num_images)]
    negatives = [p for p in s.negative_prompts for _ in range(s.num_images)]
    extra: dict[str, Any] = {}
    schedule_label = infotext.a1111_schedule_name(s.schedule) if s.schedule != "default" else None
    if schedule_label:
        extra["Schedule type"] = schedule_label
    if s.mode != "txt2img":
        extra["Denoising strength"] = s.strength
    if body.enable_hr and hires is not None:
        extra["Denoising strength"] = body.denoising_strength
        extra["Hires upscale"] = hires.settings.scale
        extra["Hires steps"] = body.hr_second_pass_steps or s.steps
        extra["Hires upscaler"] = "Lanczos"
    if s.mode == "inpaint":
        extra.update(
            {
                "Mask blur": s.mask_blur,
                "Inpaint area": "Only masked" if s.only_masked else "Whole picture",
                "Masked area padding": s.padding,
                "Masked content": infotext.A1111_FILL_NAMES.get(s.fill, s.fill),
            }
        )
    width = s.width if s.width is not None else (result.images[0].size[0] if result.images else None)
    height = s.height if s.height is not None else (result.images[0].size[1] if result.images else None)
    return {
        "prompt": prompts[0],
        "all_prompts": prompts,
        "negative_prompt": negatives[0],
        "all_negative_prompts": negatives,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": subseed,
        "all_subseeds": [subseed + i for i in range(n)],
        "subseed_strength": body.subseed_strength,
        "width": width,
        "height": height,
        "sampler_name": A1111_SAMPLER_NAMES[s.sampler],
        "cfg_scale": s.guidance_scale,
        "steps": s.steps,
        "batch_size": body.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": result.model.name,
        "sd_model_hash": result.model.hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": body.seed_resize_from_w,
        "seed_resize_from_h": body.seed_resize_from_h,
        "denoising_strength": s.strength if s.mode != "txt2img" else body.denoising_strength,
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": [t[infotext.PARAMETERS_KEY] for t in (hires or result).texts],
        "styles": [],
        "job_timestamp": job_timestamp,
        "clip_skip": s.clip_skip,
        "is_using_inpainting_conditioning": result.is_inpainting and s.mode == "inpaint",
        "version": version,
        "interrupted": result.interrupted or (hires is not None and hires.interrupted),
    }


def parameters(body: Txt2ImgBody) -> dict:
    """The request as AUTOMATIC1111 echoes it: every field with its default filled in (init images and mask left
    out unless include_init_images)."""
    echo = body.model_dump()
    if isinstance(body, Img2ImgBody) and not body.include_init_images:
        echo["init_images"] = None
        echo["mask"] = None
    return echo


def samplers() -> list[dict]:
    """GET /sdapi/v1/samplers: sd_jax's samplers under AUTOMATIC1111's names."""
    out = []
    for name in SAMPLERS:
        options = {"scheduler": A1111_AUTOMATIC[name]} if name in A1111_AUTOMATIC else {}
        out.append({"name": A1111_SAMPLER_NAMES[name], "aliases": _SAMPLER_ALIASES[name], "options": options})
    return out


def schedulers() -> list[dict]:
    """GET /sdapi/v1/schedulers: the schedulers sd_jax takes."""
    return [
        {
            "name": name,
            "label": label,
            "aliases": None,
            "default_rho": 7.0 if name == "karras" else -1.0,
            "need_inner_model": name in ("uniform", "sgm_uniform", "ddim"),
        }
        for name, (label, _) in SCHEDULERS.items()
    ]


def png_info(data: Any, max_pixels: int) -> dict:
    """POST /sdapi/v1/png-info: a PNG's infotext, its other text chunks, and the infotext parsed (values as text,
    sizes split into `Size-1` / `Size-2`, as AUTOMATIC1111 gives them)."""
    image = decode_image(data, "image", max_pixels, rotate=False)
    texts = {str(k): str(v) for k, v in getattr(image, "text", {}).items()}
    text = texts.pop(infotext.PARAMETERS_KEY, "")
    parsed = infotext.parse_infotext(text) if text else {"prompt": "", "negative_prompt": "", "parameters": {}}
    params: dict[str, str] = {"Prompt": parsed["prompt"], "Negative prompt": parsed["negative_prompt"]}
    for key, value in parsed["parameters"].items():
        parts = value.split("x")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            params[f"{key}-1"], params[f"{key}-2"] = parts[0].strip(), parts[1].strip()
        else:
            params[key] = value
    params.setdefault("Clip skip", "1")
    return {"info": text, "items": texts, "parameters": params}
