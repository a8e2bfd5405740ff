"""What the absl scripts share: their common flags, the generate-and-save run, and one-line user errors.

Each script defines its own flags (the input image, strength, mask, ...) beside `define_common_flags()`, then calls
`run_script(mode, FLAGS)`: load, check, generate with a progress bar, save PNGs with AUTOMATIC1111's `parameters`
text, sd_jax's JSON settings and the invisible watermark.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

from sd_jax.convert.params import ConversionError
from sd_jax.convert.torch_files import CheckpointError
from sd_jax.loading import LoadError
from sd_jax.tokenizer import BPEVocabNotFoundError
from sd_jax.watermark import WatermarkUnavailableError

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    ConversionError,
    CheckpointError,
    LoadError,
    BPEVocabNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    WatermarkUnavailableError,
)

# The settings of each mode that --from_png takes back from a PNG (the rest come from the command line).
_REGENERATED = (
    "prompt",
    "negative_prompt",
    "steps",
    "sampler",
    "schedule",
    "guidance_scale",
    "seed",
    "width",
    "height",
    "clip_skip",
    "eta",
    "guidance_rescale",
)


# The pipeline options every mode takes, under the same names in the settings.
_OPTIONS = (
    "negative_prompt",
    "steps",
    "guidance_scale",
    "sampler",
    "schedule",
    "eta",
    "seed",
    "num_images",
    "clip_skip",
    "guidance_rescale",
)


def run_or_exit(fn, *args, **kwargs):
    """Calls fn; a user error (bad path, flag, checkpoint or size) exits 1 with a one-line message, no traceback."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def _raise(error: Exception):
    raise error


def fail(message: str):
    """Exits 1 with `error: message`."""
    run_or_exit(_raise, ValueError(message))


def quiet_logs() -> None:
    """Keeps absl's INFO chatter (e.g. JAX probing for a TPU) off a script's stderr."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)


def define_common_flags(*, size_default: str) -> None:
    """The flags every generation script takes.

    size_default: what --height/--width default to, in words, for their help (their value is then None).
    """
    from absl import flags

    flags.DEFINE_string(
        "model",
        None,
        "Converted folder, diffusers folder, single file, or random:PRESET (random weights, e.g. random:tiny); "
        "default: the shipped shapes64 model (64x64 coloured shapes).",
    )
    flags.DEFINE_string("prompt", None, "What to draw (AUTOMATIC1111 syntax: (word:1.3), [word], BREAK).")
    flags.DEFINE_string("negative_prompt", "", "What to steer away from (same syntax).")
    flags.DEFINE_integer("steps", 50, "Denoising steps.")
    flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance scale (<= 1 turns guidance off).")
    flags.DEFINE_string("sampler", "ddim", "Sampler name (see scripts/txt2img.py --list_samplers).")
    flags.DEFINE_string("schedule", "default", "Noise schedule: default, karras or exponential.")
    flags.DEFINE_float("eta", 0.0, "DDIM eta: 0 deterministic, 1 ancestral.")
    flags.DEFINE_float("guidance_rescale", 0.0, "Rescale of the guided prediction, in [0, 1].")
    flags.DEFINE_integer("seed", 0, "Image i uses seed + i.")
    flags.DEFINE_integer("height", None, f"Image height in pixels, a multiple of 8; default: {size_default}.")
    flags.DEFINE_integer("width", None, f"Image width in pixels, a multiple of 8; default: {size_default}.")
    flags.DEFINE_integer("num_images", 1, "How many images.")
    flags.DEFINE_integer("clip_skip", 1, "1: the text encoder's last layer; 2: the penultimate; ...")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Parameter and compute dtype.")
    flags.DEFINE_string("model_type", "auto", "Single files: sd15, sd15_inpainting, sd21_base, sd21_768_v, ...")
    flags.DEFINE_string("bpe_vocab", None, "Single files / random:PRESET: CLIP's bpe_simple_vocab_16e6.txt.gz.")
    flags.DEFINE_string("output_dir", "outputs", "Where the PNGs go (existing files are never overwritten).")
    flags.DEFINE_bool("watermark", True, "Embed the invisible watermark of the original SD scripts (--nowatermark).")


def settings_from_png(path: str) -> dict:
    """The generation settings stored in a PNG: sd_jax's JSON chunk, else AUTOMATIC1111's `parameters` text."""
    from sd_jax import infotext
    from sd_jax.images import read_png_texts

    texts = read_png_texts(path)
    if infotext.SETTINGS_KEY in texts:
        try:
            settings = json.loads(texts[infotext.SETTINGS_KEY])
        except json.JSONDecodeError:
            raise ValueError(f"{path}: its {infotext.SETTINGS_KEY!r} text chunk is not valid JSON") from None
        if not isinstance(settings, dict):
            raise ValueError(f"{path}: its {infotext.SETTINGS_KEY!r} text chunk is not a JSON object")
        return settings
    if infotext.PARAMETERS_KEY in texts:
        return {"mode": "txt2img", **infotext.settings_from_infotext(texts[infotext.PARAMETERS_KEY])}
    raise ValueError(f"{path} carries no generation settings (no {infotext.PARAMETERS_KEY!r} or sd_jax text)")


def _settings(mode: str, flags_, extra: Mapping) -> dict:
    settings = {
        "mode": mode,
        "prompt": flags_.prompt,
        "negative_prompt": flags_.negative_prompt,
        "steps": flags_.steps,
        "sampler": flags_.sampler,
        "schedule": flags_.schedule,
        "guidance_scale": flags_.guidance_scale,
        "seed": flags_.seed,
        "clip_skip": flags_.clip_skip,
        "eta": flags_.eta,
        "guidance_rescale": flags_.guidance_rescale,
        "dtype": flags_.dtype,
        "model": flags_.model,
    }
    if flags_.height is not None:
        settings["height"] = flags_.height
    if flags_.width is not None:
        settings["width"] = flags_.width
    settings.update(extra)
    return settings


def _apply_png(settings: dict, flags_) -> dict:
    """--from_png: the PNG's settings replace the command line's, with one image of the PNG's seed."""
    stored = run_or_exit(settings_from_png, flags_.from_png)
    if stored.get("mode", "txt2img") != "txt2img":
        fail(f"{flags_.from_png} was made by {stored['mode']}: --from_png regenerates txt2img images only")
    settings.update({k: stored[k] for k in _REGENERATED if k in stored})
    if flags_["model"].present == 0 and stored.get("model"):
        settings["model"] = stored["model"]
    if flags_["dtype"].present == 0 and stored.get("dtype"):
        settings["dtype"] = stored["dtype"]
    settings["num_images"] = 1
    return settings


def check_inputs(mode: str, call: Mapping) -> None:
    """The checks of an editing call that need no model (files, sizes, mask, strength, margins), so a mistake is
    reported before a checkpoint is loaded. The pipeline checks them again."""
    import numpy as np

    from sd_jax import editing
    from sd_jax.pipeline import check_strength

    if "image" not in call:
        return
    image = editing.load_image(call["image"], "init image")
    if call.get("strength") is not None:
        check_strength(call["strength"])
    if mode == "inpaint":
        editing.load_mask(call["mask"], image.size)
    if mode == "outpaint":
        margins = {k: call.get(k, 0) for k in ("left", "right", "top", "bottom")}
        editing.extend_canvas(np.asarray(image), **margins, seam=call.get("seam", 8), rng=np.random.default_rng(0))
    if mode == "upscale" and not call["scale"] > 0:
        raise ValueError(f"scale must be a positive number, got {call['scale']!r}")


def _announce(settings: Mapping) -> None:
    from sd_jax.loading import RANDOM_PREFIX

    model = settings.get("model")
    if model is None:
        print(
            "no --model given: using the default shapes model (64x64; it draws captions like "
            '"a red circle on a blue background")',
            file=sys.stderr,
        )
    elif model.startswith(RANDOM_PREFIX):
        print(f"note: {model} has random weights, so the images are noise", file=sys.stderr)


def _check_size(settings: Mapping) -> None:
    """The sizes given (flags or --from_png), checked before a model is loaded; the others are the model's."""
    bad = [
        f"{side}={settings[side]}"
        for side in ("height", "width")
        if side in settings and not (isinstance(settings[side], int) and settings[side] > 0 and settings[side] % 8 == 0)
    ]
    if bad:
        fail(f"height and width must be positive multiples of 8, got {', '.join(bad)}")


def run_script(mode: str, flags_, call_kwargs: Mapping | None = None, extra_settings: Mapping | None = None):
    """A script's work: settings from flags (or --from_png), load, generate with a progress bar, save.

    Args:
      mode: "txt2img", "img2img", "inpaint", "outpaint" or "upscale": the pipeline method to call.
      call_kwargs: the mode's own arguments (image, mask, strength, ...).
      extra_settings: what the PNG metadata records of them (strength, mask_blur, ...).

    Returns:
      The paths of the written PNGs. User errors exit 1 with one line; nothing is half-written.
    """
    from tqdm import tqdm

    from sd_jax import infotext, watermark
    from sd_jax.config import SD2_PAD_TOKEN
    from sd_jax.images import save_pngs
    from sd_jax.loading import load

    settings = _settings(mode, flags_, extra_settings or {})
    settings["num_images"] = flags_.num_images
    if mode == "txt2img" and getattr(flags_, "from_png", None):
        settings = _apply_png(settings, flags_)
    if not settings["prompt"]:
        fail("--prompt is required")
    if mode == "txt2img":
        _check_size(settings)
    if flags_.watermark:
        run_or_exit(watermark.check_available)
    run_or_exit(check_inputs, mode, call_kwargs or {})
    _announce(settings)
    pipe = run_or_exit(
        load, settings["model"], settings["dtype"], model_type=flags_.model_type, bpe_vocab=flags_.bpe_vocab
    )
    if mode == "txt2img":
        for side in ("height", "width"):
            settings.setdefault(side, pipe.native_size)
    options = {key: settings[key] for key in _OPTIONS}
    if mode in ("txt2img", "img2img", "inpaint"):
        options.update(height=settings.get("height"), width=settings.get("width"))
    options.update(call_kwargs or {})
    with tqdm(total=settings["steps"], desc="sampling", unit="step", file=sys.stderr) as bar:

        def progress(step, steps):
            bar.total = steps
            bar.update(max(step - bar.n, 0))

        images = run_or_exit(getattr(pipe, mode), settings["prompt"], progress=progress, **options)

    hash_ = infotext.model_hash(pipe.source)
    common = {
        **settings,
        "model_hash": hash_,
        "model_name": Path(pipe.source).stem if pipe.source else pipe.config.name,
        "version": _version(),
    }
    seeds = [settings["seed"] + i for i in range(len(images))]  # one prompt: image i has seed + i
    texts = []
    for image, seed in zip(images, seeds, strict=True):
        one = {**common, "seed": seed, "width": image.size[0], "height": image.size[1], "num_images": 1}
        texts.append(
            {
                infotext.PARAMETERS_KEY: infotext.format_infotext(one),
                infotext.SETTINGS_KEY: json.dumps(one, sort_keys=True),
            }
        )
    payload = None
    if flags_.watermark:
        payload = watermark.PAYLOAD_SD2 if pipe.config.pad_token == SD2_PAD_TOKEN else watermark.PAYLOAD_SD1
        if not all(watermark.watermark_fits(image) for image in images):
            print(f"note: images under {watermark.MIN_SIZE} pixels a side carry no watermark", file=sys.stderr)
    return run_or_exit(save_pngs, images, flags_.output_dir, seeds, texts=texts, watermark=payload)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sd_jax")
    except PackageNotFoundError:
        return "unknown"


def list_samplers() -> str:
    """A table of the registered samplers: name, denoiser calls per step, diffusers twin."""
    from sd_jax.sampling.samplers import SAMPLERS, SCHEDULE_TYPES

    rows = [("sampler", "calls/step", "twin")]
    rows += [(s.name, str(s.calls_per_step), s.twin) for s in SAMPLERS.values()]
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]}" for r in rows]
    return "\n".join(lines + ["", f"schedules: {', '.join(SCHEDULE_TYPES)}"])
