"""`GenerationSettings`: every interface derived from its fields (pipeline keywords, flags, JSON, AUTOMATIC1111
text) stays in step with them, and its checks are one-line errors that need no model."""

import dataclasses
import inspect
from pathlib import Path

import pytest
from absl import flags

from sd_jax import infotext
from sd_jax.pipeline import StableDiffusionPipeline
from sd_jax.settings import (
    A1111_KEYS,
    MODES,
    GenerationSettings,
    define_flags,
    field_default,
    from_flags,
)
from tests.test_convert import ROOT, run_script

FIELDS = [f.name for f in dataclasses.fields(GenerationSettings)]
# Fields AUTOMATIC1111's parameter line has no key for (prompts have lines of their own, the size is "Size").
NOT_IN_A1111 = {"mode", "prompt", "negative_prompt", "height", "width", "guidance_rescale", "num_images", "tile"}
NOT_IN_A1111 |= {"left", "right", "top", "bottom", "seam"}
NOT_IN_A1111 |= {"loras"}  # written as <lora:...> tags in the prompt, with "Lora hashes"
# Not settings: what a pipeline call starts from, and how it reports.
PIPELINE_INPUTS = {"image", "mask", "latents", "progress"}


def _changed(name: str, mode: str):
    """A valid value of field `name` in `mode` other than its default."""
    return {
        "prompt": "a red (circle:1.2)",
        "negative_prompt": "blurry",
        "height": 48,
        "width": 40,
        "steps": 7,
        "guidance_scale": 5.5,
        "guidance_rescale": 0.25,
        "sampler": "dpmpp_2m",
        "schedule": "karras",
        "eta": 0.5,
        "seed": 1234,
        "num_images": 3,
        "clip_skip": 2,
        "loras": (("style", 0.5, 0.5), ("loras/b.safetensors", 1.0, 2.0)),
        "strength": 0.45,
        "mask_blur": 2.0,
        "only_masked": True,
        "padding": 12,
        "fill": "latent_noise",
        "left": 16,
        "right": 8,
        "top": 24,
        "bottom": 32,
        "seam": 4,
        "scale": 1.5,
        "tile": True,
    }[name]


def _full(mode: str) -> GenerationSettings:
    options = {name: _changed(name, mode) for name in GenerationSettings.fields_for(mode)}
    return GenerationSettings.for_mode(mode, **options).validate()


@pytest.mark.parametrize("mode", MODES)
def test_pipeline_keywords_are_the_fields(mode):
    params = inspect.signature(getattr(StableDiffusionPipeline, mode)).parameters
    keywords = {n: p.default for n, p in params.items() if n not in ("self", "prompt") and n not in PIPELINE_INPUTS}
    names = [n for n in GenerationSettings.fields_for(mode) if n != "prompt"]
    assert list(keywords) == names
    assert keywords == {n: field_default(n, mode) for n in names}


@pytest.mark.parametrize("mode", MODES)
def test_flags_are_the_fields(mode):
    values = flags.FlagValues()
    define_flags(mode, values)
    assert sorted(values) == sorted(GenerationSettings.fields_for(mode))
    values(["prog"])
    defaults = from_flags(mode, values)
    assert defaults == GenerationSettings.for_mode(mode, **{**defaults.options(), "prompt": ""})
    assert {n: getattr(defaults, n) for n in defaults.options() if n != "prompt"} == {
        n: field_default(n, mode) for n in defaults.options() if n != "prompt"
    }
    full = _full(mode)
    args = []
    for name, value in full.options().items():
        if name == "loras":
            args += [f"--loras={lora}:{te}:{unet}" for lora, te, unet in value]
        else:
            args.append(f"--{name}" if value is True else f"--{name}={value}")
    values = flags.FlagValues()
    define_flags(mode, values)
    values(["prog", *args])
    assert from_flags(mode, values) == full


def test_scripts_define_no_setting_flags_by_hand():
    for mode in MODES:
        source = (ROOT / "scripts" / f"{mode}.py").read_text()
        assert f'define_script_flags("{mode}"' in source or f'define_script_flags(\n    "{mode}"' in source
        assert "DEFINE_" not in source, mode


@pytest.mark.parametrize("mode", MODES)
def test_json_round_trip(mode):
    full = _full(mode)
    data = full.to_json()
    assert set(data) == {"mode", *GenerationSettings.fields_for(mode)}
    assert GenerationSettings.from_json(data) == full
    with pytest.raises(ValueError, match=f"{mode} takes no 'colour'"):
        GenerationSettings.from_json({**data, "colour": "red"})


def test_a1111_keys_cover_every_field_but_the_listed_ones():
    assert set(FIELDS) == set(A1111_KEYS) | NOT_IN_A1111
    assert not set(A1111_KEYS) & NOT_IN_A1111


@pytest.mark.parametrize("name", sorted(A1111_KEYS))
def test_each_a1111_key_is_written_and_read_back(name):
    mode = next(m for m in ("inpaint", "upscale", "txt2img") if name in GenerationSettings.fields_for(m))
    value = _changed(name, mode)
    if name == "eta":
        base = {"sampler": "ddim"}  # AUTOMATIC1111 writes "Eta DDIM" for DDIM only
    elif name == "schedule":
        base = {"sampler": "euler"}
    elif name == "padding":
        base = {"only_masked": True}  # the padding of "Only masked"
    else:
        base = {}
    # A parameter line needs Steps (or three pairs) to be read as one.
    text = infotext.format_infotext({"mode": mode, "prompt": "p", "steps": 20, **base, name: value})
    assert f"{A1111_KEYS[name]}: " in text
    assert infotext.settings_from_infotext(text)[name] == value


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(steps=-3), "steps must be a positive integer, got -3"),
        (dict(sampler="bogus"), "unknown sampler 'bogus'"),
        (dict(schedule="linear"), "unknown schedule 'linear'"),
        (dict(height=60), "height and width must be positive multiples of 8, got height=60"),
        (dict(guidance_rescale=2.0), r"guidance_rescale must be in \[0, 1\]"),
        (dict(eta=-0.5), r"eta must be in \[0, 1\]"),
        (dict(seed=2**32), "seed must be an integer"),
        (dict(num_images=0), "num_images must be a positive integer"),
        (dict(clip_skip=0), "clip_skip must be a positive integer"),
        (dict(prompt=["a", "b"], negative_prompt=["c"]), "1 negative prompts for 2 prompts"),
        (dict(mode="img2img", strength=1.5), r"strength must be in \[0, 1\]"),
        (dict(mode="img2img", height=64), "give both height and width"),
        (dict(mode="inpaint", fill="blur"), "unknown fill 'blur'"),
        (dict(mode="inpaint", padding=-1), "padding must be a non-negative integer"),
        (dict(mode="outpaint"), "nothing to outpaint"),
        (dict(mode="outpaint", left=10), "left=10 is not a multiple of 8"),
        (dict(mode="upscale", scale=0.0), "scale must be a positive number"),
        (dict(mode="paint"), "unknown mode 'paint'"),
    ],
)
def test_validate_names_the_bad_field_in_one_line(options, message):
    with pytest.raises(ValueError, match=message) as error:
        GenerationSettings(**{"prompt": "p", **options}).validate()
    assert "\n" not in str(error.value)


def test_a_field_of_another_mode_is_refused():
    with pytest.raises(TypeError, match="txt2img takes no 'strength'"):
        GenerationSettings.for_mode("txt2img", prompt="p", strength=0.5)
    with pytest.raises(TypeError, match="txt2img takes no 'scale'"):
        GenerationSettings(prompt="p", scale=3.0).validate()


def test_outpaint_strength_depends_on_the_model():
    settings = GenerationSettings(mode="outpaint", prompt="p", left=8)
    assert settings.resolved_strength(is_inpainting_model=True) == 1.0
    assert settings.resolved_strength(is_inpainting_model=False) == 0.8
    assert dataclasses.replace(settings, strength=0.3).resolved_strength(True) == 0.3


@pytest.mark.parametrize("bad, message", [("--sampler=bogus", "unknown sampler 'bogus'"), ("--steps=-3", "steps must")])
def test_bad_settings_fail_before_the_model_loads(tmp_path, bad, message):
    """The model path does not exist: the settings error comes first, alone on its line, with no progress bar."""
    result = run_script("scripts/txt2img.py", "--prompt=x", f"--model={tmp_path / 'nope'}", bad)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not list(Path(tmp_path).iterdir())
