"""AUTOMATIC1111's "parameters" infotext: writing it from sd_jax settings, reading it back, the model hash.

The layout, as AUTOMATIC1111's web UI writes it into a PNG's `parameters` text chunk:

    a photo of a cat                      the prompt (any number of lines)
    Negative prompt: blurry               only when there is one (any number of lines)
    Steps: 20, Sampler: DPM++ 2M, ...     `Key: value` pairs; values with `,` `:` or a newline are JSON strings

sd_jax's complete settings travel beside it, as JSON, in the `SETTINGS_KEY` chunk.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sd_jax.settings import A1111_KEYS, MASK_MODES

PARAMETERS_KEY = "parameters"  # AUTOMATIC1111's PNG text chunk
SETTINGS_KEY = "sd_jax"  # sd_jax's own PNG text chunk: json.dumps(settings, sort_keys=True)

A1111_SAMPLER_NAMES = {
    "ddim": "DDIM",
    "plms": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "dpm2": "DPM2",
    "dpm2_a": "DPM2 a",
    "dpmpp_2s_a": "DPM++ 2S a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "unipc": "UniPC",
}
# sd_jax's "default" schedule is the model's own timestep spacing; it is written as the AUTOMATIC1111 (1.9+) schedule
# type that walks the same timesteps: "DDIM" (timesteps 1, 1 + 1000 // n, ...) is SD's leading spacing with offset 1
# exactly when n divides 1000, "Uniform" and "SGM Uniform" are the nearest to linspace and trailing spacing
# (`A1111_SPACING_NAMES`). The exact setting travels in the JSON chunk. Never "Automatic": AUTOMATIC1111 reads that
# as each sampler's own default.
A1111_SCHEDULE_NAMES = {"default": "DDIM", "karras": "Karras", "exponential": "Exponential"}
A1111_SPACING_NAMES = {"leading": "DDIM", "linspace": "Uniform", "trailing": "SGM Uniform"}
# What AUTOMATIC1111 1.9+ runs for "Schedule type: Automatic" with each sampler (its samplers' `scheduler` option);
# the others walk the model's timesteps, sd_jax's "default".
A1111_AUTOMATIC = {
    "dpm2": "karras",
    "dpm2_a": "karras",
    "dpmpp_2s_a": "karras",
    "dpmpp_2m": "karras",
    "dpmpp_sde": "karras",
    "dpmpp_2m_sde": "exponential",
}
# sd_jax's "noise" has no AUTOMATIC1111 twin and is written as is.
A1111_FILL_NAMES = {
    "original": "original",
    "fill": "fill",
    "noise": "noise",
    "latent_noise": "latent noise",
    "latent_nothing": "latent nothing",
}
NEGATIVE_PREFIX = "Negative prompt:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".msgpack")

_SAMPLERS_BY_A1111 = {v: k for k, v in A1111_SAMPLER_NAMES.items()}
_SCHEDULES_BY_A1111 = {v: k for k, v in A1111_SCHEDULE_NAMES.items()} | dict.fromkeys(
    A1111_SPACING_NAMES.values(), "default"
)
_FILLS_BY_A1111 = {v: k for k, v in A1111_FILL_NAMES.items()}
# `Key: value` with value a JSON string or anything up to the next comma.
_PARAMETER = re.compile(r'\s*([^\s,:"][^,:"]*?)\s*:\s*("(?:\\.|[^\\"])*"|[^,]*?)\s*(?:,|$)')
_SIZE = re.compile(r"\s*(\d+)\s*x\s*(\d+)\s*")
_BLOCK = 1 << 20


def format_number(value: numbers.Real) -> str:
    """`7` for 7 and 7.0, `7.5`, `0.75`, `0.00001`: the shortest digits that read back to the same float."""
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if not math.isfinite(value):
        return str(float(value))
    return np.format_float_positional(value, trim="-")


def quote(text: str) -> str:
    """`text` as a JSON string when it holds a comma, colon or line break (or would not read back plainly)."""
    if any(c in text for c in ',:\n\r"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def _value(value: Any) -> str:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return format_number(value)
    return quote(str(value))


def _present(settings: Mapping, key: str) -> bool:
    return settings.get(key) is not None


def a1111_schedule_name(schedule: str, timestep_spacing: str = "leading") -> str:
    """AUTOMATIC1111's "Schedule type" for an sd_jax schedule on a model with the given timestep spacing."""
    if schedule == "default":
        return A1111_SPACING_NAMES.get(timestep_spacing, A1111_SPACING_NAMES["leading"])
    return A1111_SCHEDULE_NAMES.get(schedule, schedule)


def infotext_parameters(settings: Mapping, timestep_spacing: str = "leading") -> dict[str, Any]:
    """The `Key: value` pairs of the parameter line, in AUTOMATIC1111's order, from sd_jax's settings keys.

    timestep_spacing: the model scheduler's, which names the "default" schedule. Unknown sampler, schedule or fill
    names are written unchanged.
    """
    s = settings
    keys = A1111_KEYS
    mode = s.get("mode")
    masked = mode is None or mode in MASK_MODES
    params: dict[str, Any] = {}
    if _present(s, "steps"):
        params[keys["steps"]] = s["steps"]
    if _present(s, "sampler"):
        params[keys["sampler"]] = A1111_SAMPLER_NAMES.get(s["sampler"], s["sampler"])
    if _present(s, "schedule"):
        params[keys["schedule"]] = a1111_schedule_name(s["schedule"], timestep_spacing)
    if _present(s, "guidance_scale"):
        params[keys["guidance_scale"]] = s["guidance_scale"]
    if _present(s, "seed"):
        params[keys["seed"]] = s["seed"]
    if _present(s, "width") and _present(s, "height"):
        params["Size"] = f"{format_number(s['width'])}x{format_number(s['height'])}"
    if _present(s, "model_hash"):
        params["Model hash"] = s["model_hash"]
    if _present(s, "model_name"):
        params["Model"] = s["model_name"]
    if _present(s, "strength") and mode != "txt2img":
        params[keys["strength"]] = s["strength"]
    if _present(s, "clip_skip") and s["clip_skip"] > 1:
        params[keys["clip_skip"]] = s["clip_skip"]
    if s.get("sampler") == "ddim" and s.get("eta"):
        params[keys["eta"]] = s["eta"]
    if masked and _present(s, "mask_blur"):
        params[keys["mask_blur"]] = s["mask_blur"]
    if masked and s.get("only_masked"):
        params[keys["only_masked"]] = "Only masked"
        if _present(s, "padding"):
            params[keys["padding"]] = s["padding"]
    if masked and _present(s, "fill"):
        params[keys["fill"]] = A1111_FILL_NAMES.get(s["fill"], s["fill"])
    scale = s.get("scale", s.get("upscale"))  # "upscale": the key of earlier sd_jax versions
    if scale is not None:
        params[keys["scale"]] = scale
    for key, name in (("lora_hashes", "Lora hashes"), ("ti_hashes", "TI hashes")):
        if s.get(key):
            params[name] = ", ".join(f"{alias}: {digest}" for alias, digest in s[key].items())
    if _present(s, "version"):
        params["Version"] = f"sd_jax {s['version']}"
    return params


def format_infotext(settings: Mapping, timestep_spacing: str = "leading") -> str:
    """AUTOMATIC1111's infotext for sd_jax `settings` (keys as in the pipeline: prompt, steps, sampler, ...).

    Missing (or None) keys are left out, as are values that mean "off" (clip skip 1, DDIM eta 0, ...).
    timestep_spacing: the model scheduler's (see `a1111_schedule_name`).
    """
    lines = []
    if settings.get("prompt"):
        lines.append(str(settings["prompt"]))
    if settings.get("negative_prompt"):
        lines.append(f"{NEGATIVE_PREFIX} {settings['negative_prompt']}")
    params = infotext_parameters(settings, timestep_spacing)
    if params:
        lines.append(", ".join(f"{k}: {_value(v)}" for k, v in params.items()))
    return "\n".join(lines)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value[1:-1]
    return value


def parse_parameters(line: str) -> dict[str, str]:
    """The `Key: value` pairs of a parameter line, values unquoted; text that is not a pair is skipped."""
    return {m.group(1): _unquote(m.group(2)) for m in _PARAMETER.finditer(line)}


def _is_parameter_line(line: str) -> bool:
    # AUTOMATIC1111's rule (at least 3 pairs), plus any line with Steps, for short lines sd_jax may write.
    params = parse_parameters(line)
    return len(params) >= 3 or "Steps" in params


def parse_infotext(text: str) -> dict:
    """Splits AUTOMATIC1111-style infotext into its parts.

    Returns:
      {"prompt": str, "negative_prompt": str, "parameters": {key: value string}}. The prompt is every line
      before the `Negative prompt:` line, the negative prompt every line from it to the parameter line (the last
      line, when it holds `Key: value` pairs).
    """
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    parameters = parse_parameters(lines.pop()) if lines and _is_parameter_line(lines[-1]) else {}
    prompt: list[str] = []
    negative: list[str] | None = None
    for line in lines:
        if negative is None and line.lstrip().startswith(NEGATIVE_PREFIX):
            negative = [line.lstrip()[len(NEGATIVE_PREFIX) :].lstrip()]
        elif negative is not None:
            negative.append(line)
        else:
            prompt.append(line)
    return {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative or []), "parameters": parameters}


def sampler_from_a1111(name: str, schedule_type: str | None = None) -> tuple[str, str]:
    """sd_jax's (sampler, schedule) for AUTOMATIC1111's sampler name and "Schedule type".

    Older AUTOMATIC1111 versions name the schedule in the sampler ("DPM++ 2M Karras"); a plain name with no
    schedule type means the model's timesteps ("default"), as it does in 1.9+, which writes the type whenever it is
    another. "Automatic" is the sampler's own default there (`A1111_AUTOMATIC`); "DDIM", "Uniform" and "SGM Uniform"
    read as "default", the nearest sd_jax schedule.

    Raises:
      ValueError: a sampler or schedule type sd_jax does not have.
    """
    name = name.strip()
    by_lower = {k.lower(): v for k, v in _SAMPLERS_BY_A1111.items()}
    schedule = "default"
    sampler = _SAMPLERS_BY_A1111.get(name) or by_lower.get(name.lower())
    if sampler is None and name in A1111_SAMPLER_NAMES:
        sampler = name
    if sampler is None:
        for schedule_name, ours in _SCHEDULES_BY_A1111.items():
            base = name[: -len(schedule_name)].rstrip()
            if name.lower().endswith(" " + schedule_name.lower()) and base.lower() in by_lower:
                sampler, schedule = by_lower[base.lower()], ours
                break
    if sampler is None:
        raise ValueError(f"unknown sampler {name!r}; sd_jax has: {', '.join(A1111_SAMPLER_NAMES.values())}")
    if schedule_type is not None and schedule_type.strip().lower() == "automatic":
        schedule = A1111_AUTOMATIC.get(sampler, "default")
    elif schedule_type is not None:
        by_lower = {k.lower(): v for k, v in _SCHEDULES_BY_A1111.items()}
        if schedule_type.strip().lower() not in by_lower:
            known = ", ".join(["Automatic", *_SCHEDULES_BY_A1111])
            raise ValueError(f"unknown schedule type {schedule_type!r}; sd_jax reads: {known}")
        schedule = by_lower[schedule_type.strip().lower()]
    return sampler, schedule


def _number(params: Mapping[str, str], key: str, kind: type) -> int | float:
    text = params[key].strip()
    try:
        value = float(text)
        if kind is int:
            if not value.is_integer():
                raise ValueError
            return int(text) if text.lstrip("+-").isdigit() else int(value)
        return value
    except ValueError:
        raise ValueError(f"infotext {key!r} is not {'an integer' if kind is int else 'a number'}: {text!r}") from None


def settings_from_infotext(text: str) -> dict:
    """The sd_jax settings that AUTOMATIC1111-style infotext names; keys it does not name are left out.

    Raises:
      ValueError: an unknown sampler or schedule type, a malformed number or size (one line).
    """
    parsed = parse_infotext(text)
    p = parsed["parameters"]
    settings: dict[str, Any] = {"prompt": parsed["prompt"], "negative_prompt": parsed["negative_prompt"]}
    numbers = {"steps": int, "guidance_scale": float, "seed": int, "strength": float, "clip_skip": int, "eta": float}
    numbers |= {"mask_blur": int, "padding": int, "scale": float}
    for ours, kind in numbers.items():
        if A1111_KEYS[ours] in p:
            settings[ours] = _number(p, A1111_KEYS[ours], kind)
    if A1111_KEYS["sampler"] in p:
        settings["sampler"], settings["schedule"] = sampler_from_a1111(
            p[A1111_KEYS["sampler"]], p.get(A1111_KEYS["schedule"])
        )
    if "Size" in p:
        size = _SIZE.fullmatch(p["Size"])
        if size is None:
            raise ValueError(f"infotext 'Size' is not WIDTHxHEIGHT: {p['Size']!r}")
        settings["width"], settings["height"] = int(size.group(1)), int(size.group(2))
    if "Model hash" in p:
        settings["model_hash"] = p["Model hash"]
    for key, name in (("lora_hashes", "Lora hashes"), ("ti_hashes", "TI hashes")):
        if name in p:
            settings[key] = parse_hashes(p[name])
    if "Model" in p:
        settings["model_name"] = p["Model"]
    if A1111_KEYS["only_masked"] in p:
        settings["only_masked"] = p[A1111_KEYS["only_masked"]] == "Only masked"
    if p.get(A1111_KEYS["fill"]) in _FILLS_BY_A1111:
        settings["fill"] = _FILLS_BY_A1111[p[A1111_KEYS["fill"]]]
    return settings


def parse_hashes(text: str) -> dict[str, str]:
    """ "Lora hashes" / "TI hashes" text (`name: hash, name: hash`) as {name: hash}; malformed parts are skipped."""
    hashes = {}
    for part in text.split(","):
        name, sep, digest = part.rpartition(":")
        if sep and name.strip() and digest.strip():
            hashes[name.strip()] = digest.strip()
    return hashes


def network_alias(name: str) -> str:
    """The name a LoRA or embedding goes by in the hashes text: a path's stem, without `:` and `,` (which the
    text uses as separators), as the web UI writes it."""
    if Path(name).suffix.lower() in (".safetensors", ".pt", ".ckpt", ".bin", ".pth"):
        name = Path(name).stem
    return name.replace(":", "").replace(",", "")


def _network_hashes(pipe, settings) -> tuple[dict[str, str], dict[str, str], str]:
    """A request's "Lora hashes" and "TI hashes" ({alias: short hash}), and its prompt as the web UI would need it
    to make the same image: its `loras` written as `<lora:...>` tags at the end."""
    from sd_jax import embeddings, lora

    uses, prompts, negatives = pipe.lora_uses(settings)

    def short_hash(module, path: Path) -> str:
        return remembered_hash(module.__name__, lambda files: module.short_hash(files[0]), [Path(path)])

    lora_hashes = {network_alias(use.name): short_hash(lora, pipe.loras.resolve(use.name)) for use in uses}
    used = pipe.prompts.used_embeddings(prompts + negatives) if pipe.prompts.embeddings is not None else {}
    ti_hashes = {network_alias(name): short_hash(embeddings, path) for name, path in used.items()}
    prompt = settings.prompt if isinstance(settings.prompt, str) else settings.prompts[0]
    tags = [lora_tags_of(name, te, unet) for name, te, unet in settings.loras]
    return lora_hashes, ti_hashes, " ".join([prompt, *tags]) if tags else prompt


def lora_tags_of(name: str, te_weight: float, unet_weight: float) -> str:
    """The `<lora:...>` tag of a `loras` entry, named by its alias."""
    from sd_jax.lora.tags import LoRAUse

    return LoRAUse(network_alias(name), te_weight, unet_weight).tag()


def _weight_files(folder: Path) -> list[Path]:
    """The weight files under `folder`, sorted by relative path; hidden files and folders are skipped."""
    files = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.suffix in WEIGHT_SUFFIXES and path.is_file() and not any(p.startswith(".") for p in relative.parts):
            files.append(relative.as_posix())
    return [folder / f for f in sorted(files)]


def model_hash(path: str | os.PathLike | None) -> str | None:
    """AUTOMATIC1111's "Model hash": the first 10 hex digits of the sha256 of the model's bytes.

    A single file hashes its bytes (as AUTOMATIC1111 does). A folder (sd_jax-converted or diffusers) hashes the
    bytes of its weight files (`*.safetensors`, `*.bin`, `*.msgpack`) one after another in sorted relative-path
    order. None for None or a folder without weight files.
    """
    if path is None:
        return None
    path = Path(path)
    files = _weight_files(path) if path.is_dir() else [path]
    if not files:
        return None
    return remembered_hash("model", _sha256_prefix, files)


_HASHES: dict[tuple, str] = {}


def remembered_hash(kind: str, hash_files, files: list[Path]) -> str:
    """`hash_files(files)`, the `kind` of hash ("model", "lora", ...), computed once per file set as it is on disk
    (paths, sizes, modification times): hashing a model, LoRA or embedding per saved image would dwarf generating
    it."""
    stamp = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    key = (kind, stamp)
    if key not in _HASHES:
        _HASHES[key] = hash_files(files)
    return _HASHES[key]


def _sha256_prefix(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
    return digest.hexdigest()[:10]


def image_texts(pipe, settings, images, seeds, *, model: str | None, dtype: str) -> list[dict[str, str]]:
    """The PNG text chunks of a request's generated images: AUTOMATIC1111's `parameters` and sd_jax's settings JSON.

    Each image's record is the request's settings with its own seed and size and one image, plus what made it: the
    resolved strength, the model (as given, its hash and name), the dtype and sd_jax's version.

    Args:
      pipe: the pipeline that made them (its config, scheduler and weight source).
      settings: the request's `GenerationSettings`.
      images: the PIL images; seeds: each image's seed.
      model, dtype: the model and dtype as the user gave them (what `--from_png` loads again).
    """
    from importlib.metadata import PackageNotFoundError, version

    from sd_jax.sampling.schedules import scheduler_settings

    try:
        sd_jax_version = version("sd_jax")
    except PackageNotFoundError:
        sd_jax_version = "unknown"
    stored = dict(
        settings.to_json(),
        strength=settings.resolved_strength(pipe.config.is_inpainting),
        model=model,
        dtype=dtype,
        model_hash=model_hash(pipe.source),
        model_name=Path(pipe.source).stem if pipe.source else pipe.config.name,
        version=sd_jax_version,
    )
    if settings.mode == "txt2img":
        stored.pop("strength")
    lora_hashes, ti_hashes, a1111_prompt = _network_hashes(pipe, settings)
    stored.update({k: v for k, v in (("lora_hashes", lora_hashes), ("ti_hashes", ti_hashes)) if v})
    spacing = scheduler_settings(pipe.config.scheduler)["timestep_spacing"]
    texts = []
    for image, seed in zip(images, seeds, strict=True):
        one = {**stored, "seed": seed, "width": image.size[0], "height": image.size[1], "num_images": 1}
        parameters = format_infotext({**one, "prompt": a1111_prompt}, spacing)
        texts.append({PARAMETERS_KEY: parameters, SETTINGS_KEY: json.dumps(one, sort_keys=True)})
    return texts
