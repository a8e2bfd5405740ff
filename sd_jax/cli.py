"""What the absl scripts share: their common flags, the generate-and-save run, and one-line user errors.

A generation script is `define_script_flags(mode)` (a flag per `GenerationSettings` field of the mode, plus the
model, output, input-image and --compile_cache flags) and `main(mode, FLAGS)`: the settings are checked before the
model loads, then the images are generated with a progress bar and saved as PNGs with AUTOMATIC1111's `parameters`
text, sd_jax's JSON settings and the invisible watermark.
"""

from __future__ import annotations

import json
import sys
import time
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
    _define_compile_cache_flag()
    _define_network_flags()
    if mode == "txt2img":
        flags.DEFINE_string("from_png", None, "Regenerate an image from the settings stored in this PNG.")
        flags.DEFINE_bool("list_samplers", False, "List the samplers (name, denoiser calls per step, twin) and exit.")
    else:
        flags.DEFINE_string("init_image", None, f"The image to {_IMAGE_ROLES[mode]} (required).")
    if mode == "inpaint":
        flags.DEFINE_string("mask", None, "Mask image of the same size: white is repainted (required).")


_IMAGE_ROLES = {"img2img": "start from", "inpaint": "repaint", "outpaint": "extend", "upscale": "upscale"}


def _define_compile_cache_flag(flag_values=None) -> None:
    from absl import flags

    flags.DEFINE_bool(
        "compile_cache",
        True,
        "Keep compiled programs in JAX's persistent cache for the next run (--nocompile_cache: off); the folder is "
        "SD_JAX_COMPILE_CACHE if set (0: off), else ~/.cache/sd_jax/jax_cache.",
        flag_values=flags.FLAGS if flag_values is None else flag_values,
    )


def _define_network_flags() -> None:
    from absl import flags

    flags.DEFINE_string("lora_dir", None, "The folder of LoRA files that <lora:NAME:WEIGHT> and --loras=NAME name.")
    flags.DEFINE_string("embeddings_dir", None, "The folder of textual-inversion embeddings prompts name.")


def check_networks(settings, lora_dir: str | None, embeddings_dir: str | None) -> None:
    """The checks of a request's LoRAs and folders that need no model: the folders exist, every `<lora:...>` tag is
    well formed and every LoRA name is a file (the files themselves are checked against the model once loaded)."""
    from sd_jax.lora import tags
    from sd_jax.lora.library import LoRALibrary

    if embeddings_dir is not None and not Path(embeddings_dir).is_dir():
        raise ValueError(f"--embeddings_dir {embeddings_dir}: no such folder")
    library = LoRALibrary(lora_dir)
    names = [name for name, _, _ in settings.loras]
    for text in settings.prompts + settings.negative_prompts:
        names += [use.name for use in tags.extract(text)[1]]
    for name in names:
        library.resolve(name)


def use_compile_cache(on: bool) -> None:
    """--compile_cache: turns JAX's persistent compilation cache on (`compile_cache.enable`) or off, before anything
    compiles; `load` then leaves it as it is."""
    from sd_jax import compile_cache

    if on:
        compile_cache.enable()
    else:
        compile_cache.disable()


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
    if stored.get("lora_hashes") and flags_.lora_dir:
        taken = run_or_exit(rename_loras_by_hash, taken, stored["lora_hashes"], flags_.lora_dir)
    settings = run_or_exit(lambda: dataclasses.replace(settings, **{**taken, "num_images": 1}))
    for key in ("model", "dtype"):
        if flags_[key].present == 0 and stored.get(key):
            run[key] = stored[key]
    return settings


def rename_loras_by_hash(settings: dict, hashes: Mapping[str, str], lora_dir: str) -> dict:
    """An image's settings with each `<lora:NAME...>` tag whose NAME the LoRA folder lacks renamed to the folder's
    file of the same hash (its "Lora hashes"), as the web UI does when it reads an image's parameters."""
    import re

    from sd_jax.lora.library import LoRALibrary

    library = LoRALibrary(lora_dir)
    present = library.names()
    renames = {}
    for name, digest in hashes.items():
        if name not in present and (found := library.name_of_hash(digest)) is not None:
            renames[name] = found
    out = dict(settings)
    for key in ("prompt", "negative_prompt"):
        if isinstance(out.get(key), str):
            for old, new in renames.items():
                pattern = rf"<(lora|lyco):{re.escape(old)}(?=[:>])"
                out[key] = re.sub(pattern, lambda m, new=new: f"<{m.group(1)}:{new}", out[key])
    return out


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
    run_or_exit(check_networks, settings, flags_.lora_dir, flags_.embeddings_dir)
    use_compile_cache(flags_.compile_cache)
    _announce(run["model"])
    pipe = run_or_exit(
        load,
        run["model"],
        run["dtype"],
        model_type=flags_.model_type,
        bpe_vocab=flags_.bpe_vocab,
        lora_dir=flags_.lora_dir,
        embeddings_dir=flags_.embeddings_dir,
    )
    # The per-step bar is a host callback inside the compiled program, and JAX never caches a program that has one:
    # on a terminal the bar is worth a compilation per process; in a log, the program runs without it and comes
    # from the persistent cache when an earlier process compiled it.
    bar = _ProgressBar() if sys.stderr.isatty() else None
    start = time.perf_counter()
    try:
        images = run_or_exit(pipe.generate, settings, inputs.get("image"), inputs.get("mask"), progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if bar is None:
        print(f"sampling: {len(images)} image(s) in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    seeds = [settings.seed + i for i in range(len(images))]  # one prompt: image i has seed + i
    texts = infotext.image_texts(pipe, settings, images, seeds, model=run["model"], dtype=run["dtype"])
    return run_or_exit(
        save_generated, images, flags_.output_dir, seeds, texts, family=pipe.config.family, watermark=flags_.watermark
    )


def list_samplers() -> str:
    """A table of the registered samplers: name, denoiser calls per step, diffusers twin."""
    from sd_jax.sampling.samplers import SAMPLERS, SCHEDULE_TYPES

    rows = [("sampler", "calls/step", "twin")]
    rows += [(s.name, str(s.calls_per_step), s.twin) for s in SAMPLERS.values()]
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]}" for r in rows]
    return "\n".join(lines + ["", f"schedules: {', '.join(SCHEDULE_TYPES)}"])


def define_batch_flags() -> None:
    """scripts/generate_batch.py's flags: the prompts file, a flag per `GenerationSettings` field (the defaults of
    every line), the model and output flags, the input images of lines that give none, and multi-host."""
    from absl import flags

    from sd_jax import settings

    settings.define_flags(None, size_default="the model's native size, or the init image's")
    flags.DEFINE_string("prompts_file", None, "One prompt a line, or JSONL: one GenerationSettings object a line.")
    flags.DEFINE_enum("mode", "txt2img", list(settings.MODES), "The mode of lines that name none.")
    flags.DEFINE_string("output_dir", None, "Where the PNGs and the manifest go; rerun the command to resume.")
    flags.DEFINE_string("model", None, "As the generation scripts' --model (default: the shipped shapes64 model).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Parameter and compute dtype.")
    flags.DEFINE_string("model_type", "auto", "Single files: sd15, sd15_inpainting, sd21_base, sd21_768_v, ...")
    flags.DEFINE_string("bpe_vocab", None, "Single files / random:PRESET: CLIP's bpe_simple_vocab_16e6.txt.gz.")
    flags.DEFINE_string("init_image", None, "The input image of editing lines that give none.")
    flags.DEFINE_string("mask", None, "The mask of inpaint lines that give none.")
    flags.DEFINE_bool("watermark", True, "Embed the invisible watermark of the original SD scripts (--nowatermark).")
    _define_compile_cache_flag()
    _define_network_flags()
    flags.DEFINE_integer("batch_size", None, "Images per compiled call (default: one per device and micro-batch).")
    flags.DEFINE_integer("micro_batch", 1, "Images per U-Net call on each device (images differ between settings).")
    flags.DEFINE_string(
        "coordinator_address", None, "Multi-host: host:port of process 0 (JAX auto-detects on TPU, SLURM)."
    )
    flags.DEFINE_integer("num_processes", None, "Multi-host: how many processes.")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def batch_main(flags_) -> None:
    """scripts/generate_batch.py: read and check the prompts file, join the hosts, load, make the missing images."""
    import dataclasses

    from sd_jax import batch, batch_files, watermark
    from sd_jax import settings as settings_lib
    from sd_jax.loading import load
    from sd_jax.parallel import batch_mesh, initialize_distributed
    from sd_jax.settings import GenerationSettings

    quiet_logs()
    if not flags_.prompts_file or not flags_.output_dir:
        fail("--prompts_file and --output_dir are required")
    names = [f.name for f in dataclasses.fields(GenerationSettings) if f.name != "mode"]
    defaults = {name: flags_[name].value for name in names}
    run_or_exit(settings_lib.check_values, defaults)  # a bad flag spoils every line: an error before anything runs
    if Path(flags_.output_dir).exists() and not Path(flags_.output_dir).is_dir():
        fail(f"--output_dir {flags_.output_dir} is a file, not a folder")
    requests, bad_lines = run_or_exit(
        batch_files.read_prompts_file,
        flags_.prompts_file,
        defaults,
        default_mode=flags_.mode,
        init_image=flags_.init_image,
        mask=flags_.mask,
    )
    if flags_.watermark:
        run_or_exit(watermark.check_available)
    if flags_.micro_batch < 1:
        fail(f"--micro_batch must be a positive integer, got {flags_.micro_batch}")
    for key in ("lora_dir", "embeddings_dir"):
        if flags_[key].value is not None and not Path(flags_[key].value).is_dir():
            fail(f"--{key} {flags_[key].value}: no such folder")
    run_or_exit(initialize_distributed, flags_.coordinator_address, flags_.num_processes, flags_.process_id)
    use_compile_cache(flags_.compile_cache)
    import jax

    _announce(flags_.model)
    pipe = run_or_exit(
        load,
        flags_.model,
        flags_.dtype,
        model_type=flags_.model_type,
        bpe_vocab=flags_.bpe_vocab,
        mesh=batch_mesh(jax.local_devices()),  # each process works alone on its own devices
        micro_batch=flags_.micro_batch,
        lora_dir=flags_.lora_dir,
        embeddings_dir=flags_.embeddings_dir,
    )
    process, count = jax.process_index(), jax.process_count()
    if process == 0:
        for bad in bad_lines:
            print(f"warning: skipped {bad.error}", file=sys.stderr)
    summary = run_or_exit(
        batch.run_job,
        pipe,
        requests,
        flags_.output_dir,
        bad_lines=bad_lines,
        model=flags_.model,
        dtype=flags_.dtype,
        process_id=process,
        num_processes=count,
        batch_size=flags_.batch_size,
        watermark=flags_.watermark,
        show_progress=process == 0,
    )
    prefix = f"process {process} of {count}: " if count > 1 else ""
    print(prefix + summary.line(), file=sys.stderr)
    if summary.failed:
        print(f"error: {summary.failed} images or lines failed: see the manifest's error fields", file=sys.stderr)
        sys.exit(1)
