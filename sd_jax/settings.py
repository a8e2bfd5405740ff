"""One description of a generation request, from command-line flag to pixel: `GenerationSettings`.

Every generation option is a field here, once, with its default, its help and the modes it applies to. From the
fields, and nowhere else, come the pipeline methods' keyword arguments (`signature`), the scripts' absl flags
(`define_flags` / `from_flags`), the JSON stored in a PNG and read back by `--from_png` (`to_json` /
`from_json`), and the keys of AUTOMATIC1111's `parameters` text (`A1111_KEYS`, used by `sd_jax.infotext`).

    settings = GenerationSettings(mode="txt2img", prompt="a red circle on a blue background", steps=20).validate()
    settings.to_json()   # {"mode": "txt2img", "prompt": "...", "steps": 20, ...}

`validate()` needs no model: what depends on one (a VAE's latent factor other than 8, a schedule shorter than
the steps, the images' sizes) is checked again by the pipeline.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sd_jax.editing import FILLS

MODES = ("txt2img", "img2img", "inpaint", "outpaint", "upscale")
IMAGE_MODES = MODES[1:]  # modes that start from an image: strength applies
MASK_MODES = ("inpaint", "outpaint")
MAX_SEED = 2**32 - 1  # PRNG seeds are 32-bit (as AUTOMATIC1111's); larger ones would alias
SIZE_MULTIPLE = 8  # Stable Diffusion's VAE: pixels per latent
# strength=None means the mode's default; outpaint's depends on the model (`resolved_strength`).
STRENGTH_DEFAULTS = {"img2img": 0.75, "inpaint": 1.0, "upscale": 0.35}
_MARGINS = ("left", "right", "top", "bottom")


def _field(default: Any, help: str, modes: Sequence[str] = MODES, a1111: str | None = None):
    """A settings field: its default, its flag help, the modes it applies to and its AUTOMATIC1111 key."""
    return dataclasses.field(default=default, metadata={"help": help, "modes": tuple(modes), "a1111": a1111})


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Every option of one generation request (see the module docstring). Prompts given as lists become tuples."""

    mode: str = _field("txt2img", "What to do: " + ", ".join(MODES) + ".")
    prompt: str | tuple[str, ...] = _field("", "What to draw (AUTOMATIC1111 syntax: (word:1.3), [word], BREAK).")
    negative_prompt: str | tuple[str, ...] = _field("", "What to steer away from (same syntax).")
    height: int | None = _field(None, "Image height in pixels, a multiple of 8.", ("txt2img", "img2img", "inpaint"))
    width: int | None = _field(None, "Image width in pixels, a multiple of 8.", ("txt2img", "img2img", "inpaint"))
    steps: int = _field(50, "Denoising steps.", a1111="Steps")
    guidance_scale: float = _field(7.5, "Classifier-free guidance scale (<= 1 turns guidance off).", a1111="CFG scale")
    guidance_rescale: float = _field(0.0, "Rescale of the guided prediction toward the conditional one's, in [0, 1].")
    sampler: str = _field("ddim", "Sampler name (see scripts/txt2img.py --list_samplers).", a1111="Sampler")
    schedule: str = _field("default", "Noise schedule: default, karras or exponential.", a1111="Schedule type")
    eta: float = _field(0.0, "DDIM eta: 0 deterministic, 1 ancestral.", a1111="Eta DDIM")
    seed: int = _field(0, "Image i uses seed + i.", a1111="Seed")
    num_images: int = _field(1, "Images per prompt.")
    clip_skip: int = _field(1, "1: the text encoder's last layer; 2: the penultimate; ...", a1111="Clip skip")
    loras: tuple[tuple[str, float, float], ...] = _field(
        (),
        "LoRA files: NAME[:WEIGHT[:UNET_WEIGHT]], NAME a file of --lora_dir or a path; repeat the flag for several "
        "(as <lora:NAME:WEIGHT> in the prompt).",
    )
    strength: float | None = _field(
        None, "How much of the schedule runs, in [0, 1]; 1 starts from pure noise.", IMAGE_MODES, "Denoising strength"
    )
    mask_blur: float = _field(
        4.0, "Gaussian blur radius of the mask in pixels (the paste-back seam).", ("inpaint",), "Mask blur"
    )
    only_masked: bool = _field(
        False, "Work on the mask's box plus --padding at --width x --height, paste back.", ("inpaint",), "Inpaint area"
    )
    padding: int = _field(32, "Pixels around the mask's box with --only_masked.", ("inpaint",), "Masked area padding")
    fill: str = _field(
        "original", "Start of the repainted area: " + ", ".join(FILLS) + ".", ("inpaint",), "Masked content"
    )
    left: int = _field(0, "Pixels to add on the left, a multiple of 8.", ("outpaint",))
    right: int = _field(0, "Pixels to add on the right, a multiple of 8.", ("outpaint",))
    top: int = _field(0, "Pixels to add on the top, a multiple of 8.", ("outpaint",))
    bottom: int = _field(0, "Pixels to add on the bottom, a multiple of 8.", ("outpaint",))
    seam: int = _field(8, "Pixels of the image blended into the new area.", ("outpaint",))
    scale: float = _field(2.0, "Size factor (the result is rounded to multiples of 8).", ("upscale",), "Hires upscale")
    tile: bool | None = _field(
        None, "Encode and decode with the VAE in tiles (default: above a megapixel).", ("img2img", "upscale")
    )

    def __post_init__(self):
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "loras", _lora_entries(self.loras))

    # -- what applies where --------------------------------------------------------------------------------------
    @staticmethod
    def fields_for(mode: str) -> tuple[str, ...]:
        """The fields a mode takes (besides `mode`), in declaration order."""
        _check_mode(mode)
        return tuple(f.name for f in dataclasses.fields(GenerationSettings) if f.name != "mode" and mode in _modes(f))

    @classmethod
    def for_mode(cls, mode: str, **options) -> GenerationSettings:
        """Settings of `mode` from keyword options; an option the mode does not take is a one-line error."""
        allowed = cls.fields_for(mode)
        unknown = [k for k in options if k not in allowed]
        if unknown:
            raise TypeError(f"{mode} takes no {', '.join(repr(k) for k in unknown)}; it takes: {', '.join(allowed)}")
        return cls(mode=mode, **options)

    def options(self) -> dict[str, Any]:
        """The mode's fields and their values (what `for_mode` takes back)."""
        return {name: getattr(self, name) for name in self.fields_for(self.mode)}

    def resolved_strength(self, is_inpainting_model: bool = False) -> float | None:
        """`strength`, or the mode's default: img2img 0.75, inpaint 1, upscale 0.35, outpaint 1 for 9-channel
        inpainting models (they see the known image) and 0.8 for others (they start from its stretched edges)."""
        if self.strength is not None or self.mode == "txt2img":
            return self.strength
        if self.mode == "outpaint":
            return 1.0 if is_inpainting_model else 0.8
        return STRENGTH_DEFAULTS[self.mode]

    @property
    def prompts(self) -> list[str]:
        """The prompts, one or many."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def negative_prompts(self) -> list[str]:
        """One negative prompt per prompt."""
        if isinstance(self.negative_prompt, str):
            return [self.negative_prompt] * len(self.prompts)
        return list(self.negative_prompt)

    # -- checks --------------------------------------------------------------------------------------------------
    def validate(self) -> GenerationSettings:
        """Raises a one-line ValueError naming the first bad field (or TypeError for a field of another mode set
        away from its default); returns self. Needs no model."""
        _check_mode(self.mode)
        for f in dataclasses.fields(self):
            if f.name != "mode" and self.mode not in _modes(f) and getattr(self, f.name) != f.default:
                raise TypeError(f"{self.mode} takes no {f.name!r}")
        self._check_prompts()
        if self.height is not None or self.width is not None:
            bad = [
                f"{side}={getattr(self, side)}"
                for side in ("height", "width")
                if getattr(self, side) is not None and not _positive_int(getattr(self, side), SIZE_MULTIPLE)
            ]
            if bad:
                raise ValueError(f"height and width must be positive multiples of 8, got {', '.join(bad)}")
            if self.mode == "img2img" and (self.height is None) != (self.width is None):
                raise ValueError("give both height and width, or neither (the image's own size)")
        if not _positive_int(self.steps):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not _real(self.guidance_scale) or not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {self.guidance_scale!r}")
        if not _real(self.guidance_rescale) or not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale!r}")
        if not _real(self.eta) or not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        from sd_jax.sampling import samplers

        samplers.check(self.sampler, self.schedule)
        if not _positive_int(self.num_images):
            raise ValueError(f"num_images must be a positive integer, got {self.num_images!r}")
        if not _whole(self.seed) or not 0 <= self.seed <= MAX_SEED - self.num_images + 1:
            raise ValueError(f"seed must be an integer in [0, 2**32 - num_images], got {self.seed!r}")
        if not _positive_int(self.clip_skip):
            raise ValueError(f"clip_skip must be a positive integer, got {self.clip_skip!r}")
        for entry in self.loras:
            if not (
                isinstance(entry, tuple)
                and len(entry) == 3
                and isinstance(entry[0], str)
                and entry[0]
                and all(_real(w) and math.isfinite(w) for w in entry[1:])
            ):
                raise ValueError(f"loras entries are NAME[:WEIGHT[:UNET_WEIGHT]] or (name, weight), got {entry!r}")
        if self.strength is not None:
            check_strength(self.strength)
        self._check_mode_options()
        return self

    def _check_prompts(self) -> None:
        prompts = self.prompts
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        negatives = self.negative_prompts
        if not all(isinstance(n, str) for n in negatives):
            raise ValueError("negative_prompt must be a string or a list of strings")
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")

    def _check_mode_options(self) -> None:
        if self.mode == "inpaint":
            if not _real(self.mask_blur) or not math.isfinite(self.mask_blur) or self.mask_blur < 0:
                raise ValueError(f"mask_blur must be a non-negative number, got {self.mask_blur!r}")
            if not _whole(self.padding) or self.padding < 0:
                raise ValueError(f"padding must be a non-negative integer, got {self.padding!r}")
            if self.fill not in FILLS:
                raise ValueError(f"unknown fill {self.fill!r}; choose one of {', '.join(FILLS)}")
        if self.mode == "outpaint":
            for name in _MARGINS:
                value = getattr(self, name)
                if not _whole(value):
                    raise ValueError(f"{name}={value!r} must be a whole number of pixels")
                if value < 0:
                    raise ValueError(f"{name}={value} must not be negative")
                if value % SIZE_MULTIPLE:
                    raise ValueError(f"{name}={value} is not a multiple of {SIZE_MULTIPLE}")
            if not any(getattr(self, name) for name in _MARGINS):
                raise ValueError("nothing to outpaint: give left, right, top or bottom")
            if not _whole(self.seam) or self.seam < 0:
                raise ValueError(f"seam={self.seam!r} must be a whole number of pixels >= 0")
        if self.mode == "upscale" and (not _real(self.scale) or not math.isfinite(self.scale) or self.scale <= 0):
            raise ValueError(f"scale must be a positive number, got {self.scale!r}")

    # -- JSON (the PNG's sd_jax chunk, batch-job lines, the HTTP API) ------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The mode and its fields as JSON values (prompt lists as lists)."""
        out = {"mode": self.mode}
        for name, value in self.options().items():
            out[name] = list(value) if isinstance(value, tuple) else value
        out["loras"] = [list(entry) for entry in self.loras]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, ignore: Iterable[str] = ()) -> GenerationSettings:
        """Settings from `to_json`'s form. Keys in `ignore` (e.g. a PNG's model_hash) are skipped; any other key
        the mode does not take is a one-line error."""
        if not isinstance(data, Mapping):
            raise ValueError(f"settings must be a JSON object, got {type(data).__name__}")
        mode = data.get("mode", "txt2img")
        options = {k: v for k, v in data.items() if k != "mode" and k not in set(ignore)}
        try:
            return cls.for_mode(mode, **options)
        except TypeError as e:
            raise ValueError(str(e)) from None


def check_values(values: Mapping[str, Any]) -> None:
    """Checks each field value on its own (e.g. a batch job's flags, the defaults of lines of any mode): a one-line
    ValueError for the first that no request could take. None leaves a field at its default."""
    for name, value in values.items():
        f = GenerationSettings.__dataclass_fields__[name]
        if value is None or value == f.default or name == "prompt":
            continue
        mode = _modes(f)[0]
        base = {"prompt": "x", "left": SIZE_MULTIPLE} if mode == "outpaint" and name != "left" else {"prompt": "x"}
        if mode == "outpaint" and name == "left":
            base["right"] = SIZE_MULTIPLE
        try:
            GenerationSettings.for_mode(mode, **{**base, name: value}).validate()
        except TypeError as e:
            raise ValueError(str(e)) from None


def check_strength(strength: float) -> None:
    """Raises a one-line ValueError unless 0 <= strength <= 1."""
    if not _real(strength) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")


# ---------------------------------------------------------------------------------------------------------------
# Derived interfaces: pipeline signatures, absl flags, AUTOMATIC1111 keys

A1111_KEYS = {f.name: f.metadata["a1111"] for f in dataclasses.fields(GenerationSettings) if f.metadata.get("a1111")}


def field_default(name: str, mode: str) -> Any:
    """A field's default in `mode` (strength: the mode's own default)."""
    if name == "strength":
        return STRENGTH_DEFAULTS.get(mode)
    return GenerationSettings.__dataclass_fields__[name].default


def signature(mode: str, inputs: Sequence[inspect.Parameter] = ()) -> Callable:
    """A decorator giving a pipeline method `(self, prompt, <inputs>, *, <mode's fields>, <keyword inputs>)` as its
    signature: what `help()` and `inspect.signature` show, derived from the fields (the method takes **options)."""

    def decorate(method: Callable) -> Callable:
        P = inspect.Parameter
        params = [P("self", P.POSITIONAL_OR_KEYWORD), P("prompt", P.POSITIONAL_OR_KEYWORD)]
        params += [p for p in inputs if p.kind is P.POSITIONAL_OR_KEYWORD]
        for name in GenerationSettings.fields_for(mode):
            if name != "prompt":
                params.append(P(name, P.KEYWORD_ONLY, default=field_default(name, mode)))
        params += [p for p in inputs if p.kind is P.KEYWORD_ONLY]
        method.__signature__ = inspect.Signature(params)
        return method

    return decorate


def define_flags(mode: str | None, flag_values=None, *, size_default: str = "the model's native size") -> None:
    """Defines an absl flag for each of the mode's fields, with the field's help and the mode's default; mode None:
    every field, with the field's own default (a batch job's flags, whose lines choose their modes)."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    fields = {f.name: f for f in dataclasses.fields(GenerationSettings)}
    names = [name for name in fields if name != "mode"] if mode is None else GenerationSettings.fields_for(mode)
    for name in names:
        f = fields[name]
        default = f.default if mode is None else field_default(name, mode)
        help = f.metadata["help"]
        if name in ("height", "width"):
            help = f"{help[:-1]}; default: {size_default}."
        elif name == "strength" and mode in ("outpaint", None):
            help += " Default: 1 for inpainting models, 0.8 for others." if mode else " Default: the mode's."
        if mode is None and set(_modes(f)) != set(MODES):
            help += f" ({', '.join(_modes(f))})"
        if name == "prompt":
            flags.DEFINE_string(name, None, help, flag_values=fv)
        elif name == "loras":
            flags.DEFINE_multi_string(name, [], help, flag_values=fv)
        elif f.type in ("bool", "bool | None"):
            flags.DEFINE_bool(name, default, help, flag_values=fv)
        elif f.type in ("int", "int | None"):
            flags.DEFINE_integer(name, default, help, flag_values=fv)
        elif f.type in ("float", "float | None"):
            flags.DEFINE_float(name, default, help, flag_values=fv)
        else:
            flags.DEFINE_string(name, default, help, flag_values=fv)


def from_flags(mode: str, flag_values) -> GenerationSettings:
    """The settings the command line gives for `mode` (flags defined by `define_flags`); not yet validated."""
    options = {name: flag_values[name].value for name in GenerationSettings.fields_for(mode)}
    if options["prompt"] is None:
        options["prompt"] = ""
    return GenerationSettings.for_mode(mode, **options)


def parse_lora_entry(text: str) -> tuple[str, float, float]:
    """`NAME[:WEIGHT[:UNET_WEIGHT]]` (a --loras flag) as (name, text encoder weight, U-Net weight); the name may
    hold colons (a path): only trailing numbers are weights."""
    parts = text.split(":")
    weights: list[float] = []
    while len(parts) > 1 and len(weights) < 2:
        try:
            weight = float(parts[-1])
        except ValueError:
            break
        weights.insert(0, weight)
        parts.pop()
    te = weights[0] if weights else 1.0
    return ":".join(parts), te, weights[1] if len(weights) > 1 else te


def _lora_entries(value) -> Any:
    """`loras` as (name, te weight, unet weight) tuples, from strings (`parse_lora_entry`), (name,), (name, weight)
    or (name, te, unet) sequences; anything else is kept for `validate` to name."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        return value
    entries = []
    for entry in value:
        if isinstance(entry, str):
            entry = parse_lora_entry(entry)
        elif isinstance(entry, Sequence) and 1 <= len(entry) <= 3:
            entry = tuple(entry)
            if len(entry) < 3:
                entry = (entry[0], *([1.0] if len(entry) == 1 else [entry[1]]) * 2)
        entries.append(entry)
    return tuple(entries)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def _modes(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata.get("modes", MODES)


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(value, multiple: int = 1) -> bool:
    return _whole(value) and value > 0 and value % multiple == 0
