"""What the absl scripts share: their common flags, the generate-and-save run, and one-line user errors.

A generation script is `define_script_flags(mode)` (a flag per `GenerationSettings` field of the mode, plus the
model, output and input-image flags) and `main(mode, FLAGS)`: the settings are checked before the model loads, then
the images are generated with a progress bar and saved as PNGs with AUTOMATIC1111's `parameters` text, sd_jax's
JSON settings and the invisible watermark.
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


def define_script_flags(mode: str, *, size_default: str = "the model's native size") -> None:
    """A generation script's flags: one per `GenerationSettings` field of the mode, the model and output flags, and
    the mode's input images (--init_image, --mask) or, for txt2img, --from_png and --list_samplers."""
    from absl import flags

    from sd_jax import settings

    settings.define_flags(mode, size_default=size_default)
    flags.DEFINE_string(
        "model",
        None,
        "Converted folder, diffusers folder, single file, or random:PRESET (random weights, e.g. random:tiny); "
        "default: the shipped shapes64 model (64x64 coloured shapes).",
    )
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Parameter and compute dtype.")
    flags.DEFINE_string("model_type", "auto", "Single files: sd15, sd15_inpainting, sd21_base, sd21_768_v, ...")
    flags.DEFINE_string("bpe_vocab", None, "Single files / random:PRESET: CLIP's bpe_simple_vocab_16e6.txt.gz.")
    flags.DEFINE_string("output_dir", "outputs", "Where the PNGs go (existing files are never overwritten).")
    flags.DEFINE_bool("watermark", True, "Embed the invisible watermark of the original SD scripts (--nowatermark).")
    if mode == "txt2img":
        flags.DEFINE_string("from_png", None, "Regenerate an image from the settings stored in this PNG.")
        flags.DEFINE_bool("list_samplers", False, "List the samplers (name, denoiser calls per step, twin) and exit.")
    else:
        flags.DEFINE_string("init_image", None, f"The image to {_IMAGE_ROLES[mode]} (required).")
    if mode == "inpaint":
        flags.DEFINE_string("mask", None, "Mask image of the same size: white is repainted (required).")


_IMAGE_ROLES = {"img2img": "start from", "inpaint": "repaint", "outpaint": "extend", "upscale": "upscale"}


def main(mode: str, flags_) -> None:
    """A generation script's main: --list_samplers, or generate and print the written paths."""
    quiet_logs()
    if mode == "txt2img" and flags_.list_samplers:
        print(list_samplers())
        return
    for path in run_script(mode, flags_):
        print(path)


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


def _apply_png(settings, flags_, run: dict):
    """--from_png: the PNG's txt2img settings replace the command line's, with one image of the PNG's seed; its
    model and dtype too, unless given on the command line."""
    import dataclasses

    from sd_jax.settings import GenerationSettings

    stored = run_or_exit(settings_from_png, flags_.from_png)
    if stored.get("mode", "txt2img") != "txt2img":
        fail(f"{flags_.from_png} was made by {stored['mode']}: --from_png regenerates txt2img images only")
    taken = {k: stored[k] for k in GenerationSettings.fields_for("txt2img") if k in stored}
    settings = run_or_exit(lambda: dataclasses.replace(settings, **{**taken, "num_images": 1}))
    for key in ("model", "dtype"):
        if flags_[key].present == 0 and stored.get(key):
            run[key] = stored[key]
    return settings


def check_inputs(settings, inputs: Mapping) -> None:
    """The checks of an editing call's input files that need no model (readable images, the mask's size), so a
    mistake is reported before a checkpoint is loaded. The pipeline checks them again."""
    from sd_jax import editing

    if "image" not in inputs:
        return
    image = editing.load_image(inputs["image"], "init image")
    if settings.mode == "inpaint":
        editing.load_mask(inputs["mask"], image.size)
    if settings.mode == "outpaint":
        editing.check_multiple(*image.size, what="image")


def _announce(model: str | None) -> None:
    from sd_jax.loading import RANDOM_PREFIX

    if model is None:
        print(
            "no --model given: using the default shapes model (64x64; it draws captions like "
            '"a red circle on a blue background")',
            file=sys.stderr,
        )
    elif model.startswith(RANDOM_PREFIX):
        print(f"note: {model} has random weights, so the images are noise", file=sys.stderr)


class _ProgressBar:
    """A sampling progress bar on stderr, opened at the first step (so an error before it stands on its own line)."""

    def __init__(self):
        self.bar = None

    def __call__(self, step: int, steps: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=steps, desc="sampling", unit="step", file=sys.stderr)
        self.bar.total = steps
        self.bar.update(max(step - self.bar.n, 0))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_script(mode: str, flags_) -> list[str]:
    """A script's work: settings from flags (or --from_png), checked; load; generate with a progress bar; save.

    Returns:
      The paths of the written PNGs. User errors exit 1 with one line, before the model loads where they can;
      nothing is half-written.
    """
    from sd_jax import infotext, watermark
    from sd_jax import settings as settings_lib
    from sd_jax.images import save_generated
    from sd_jax.loading import load
    from sd_jax.sampling.schedules import scheduler_settings

    settings = run_or_exit(settings_lib.from_flags, mode, flags_)
    run = {"model": flags_.model, "dtype": flags_.dtype}
    if mode == "txt2img" and flags_.from_png:
        settings = _apply_png(settings, flags_, run)
    if not settings.prompt:
        fail("--prompt is required")
    run_or_exit(settings.validate)
    inputs = {}
    if mode != "txt2img":
        if not flags_.init_image or (mode == "inpaint" and not flags_.mask):
            fail("--init_image and --mask are required" if mode == "inpaint" else "--init_image is required")
        inputs["image"] = flags_.init_image
        if mode == "inpaint":
            inputs["mask"] = flags_.mask
    if flags_.watermark:
        run_or_exit(watermark.check_available)
    run_or_exit(check_inputs, settings, inputs)
    _announce(run["model"])
    pipe = run_or_exit(load, run["model"], run["dtype"], model_type=flags_.model_type, bpe_vocab=flags_.bpe_vocab)
    options = {k: v for k, v in settings.options().items() if k != "prompt" and not (k == "strength" and v is None)}
    bar = _ProgressBar()
    try:
        images = run_or_exit(getattr(pipe, mode), settings.prompt, **inputs, progress=bar, **options)
    finally:
        bar.close()

    stored = dict(
        settings.to_json(),
        strength=settings.resolved_strength(pipe.config.is_inpainting),
        model=run["model"],
        dtype=run["dtype"],
        model_hash=infotext.model_hash(pipe.source),
        model_name=Path(pipe.source).stem if pipe.source else pipe.config.name,
        version=_version(),
    )
    if mode == "txt2img":
        stored.pop("strength")
    spacing = scheduler_settings(pipe.config.scheduler)["timestep_spacing"]
    seeds = [settings.seed + i for i in range(len(images))]  # one prompt: image i has seed + i
    texts = []
    for image, seed in zip(images, seeds, strict=True):
        one = {**stored, "seed": seed, "width": image.size[0], "height": image.size[1], "num_images": 1}
        texts.append(
            {
                infotext.PARAMETERS_KEY: infotext.format_infotext(one, spacing),
                infotext.SETTINGS_KEY: json.dumps(one, sort_keys=True),
            }
        )
    return run_or_exit(
        save_generated, images, flags_.output_dir, seeds, texts, family=pipe.config.family, watermark=flags_.watermark
    )


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
