"""AUTOMATIC1111 infotext: exact layout, parsing real and own strings back, model hash, PNG text chunks."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from sd_jax.images import read_png_texts, save_pngs
from sd_jax.infotext import (
    A1111_SAMPLER_NAMES,
    A1111_SCHEDULE_NAMES,
    PARAMETERS_KEY,
    SETTINGS_KEY,
    format_infotext,
    format_number,
    model_hash,
    parse_infotext,
    settings_from_infotext,
)
from sd_jax.sampling.samplers import SAMPLERS, SCHEDULE_TYPES

CAT = {
    "mode": "txt2img",
    "prompt": "a photo of a cat",
    "negative_prompt": "blurry",
    "steps": 20,
    "sampler": "dpmpp_2m",
    "schedule": "karras",
    "guidance_scale": 7.5,
    "seed": 1,
    "width": 512,
    "height": 512,
    "model_hash": "0123456789",
    "model_name": "sd15",
    "strength": 0.75,  # txt2img: not written
    "clip_skip": 1,  # the default: not written
    "eta": 0.0,
    "version": "0.1.0",
}
CAT_TEXT = (
    "a photo of a cat\n"
    "Negative prompt: blurry\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, "
    "Model hash: 0123456789, Model: sd15, Version: sd_jax 0.1.0"
)
A1111_TEXT = (
    "masterpiece, best quality, a castle on a hill\n"
    "at sunset, (detailed:1.2)\n"
    "Negative prompt: lowres, bad anatomy\n"
    "worst quality\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 123456, Size: 512x768, Model hash: 6ce0161689, "
    'Model: v1-5-pruned-emaonly, Lora hashes: "a: 123, b: 456", Version: v1.6.0'
)


def test_txt2img_layout():
    assert format_infotext(CAT) == CAT_TEXT


def test_no_negative_line_when_empty():
    text = format_infotext({**CAT, "negative_prompt": ""})
    assert text == CAT_TEXT.replace("Negative prompt: blurry\n", "")
    assert "Negative prompt" not in format_infotext({k: v for k, v in CAT.items() if k != "negative_prompt"})


def test_values_with_commas_colons_newlines_are_json_quoted():
    text = format_infotext({"prompt": "p", "steps": 5, "model_name": 'a, b: "c"\nd', "seed": 3})
    assert text == 'p\nSteps: 5, Seed: 3, Model: "a, b: \\"c\\"\\nd"'
    assert parse_infotext(text)["parameters"]["Model"] == 'a, b: "c"\nd'


def test_numbers_are_compact_and_exact():
    assert [format_number(x) for x in (7.0, 7.5, 0.75, 3, 1e-5)] == ["7", "7.5", "0.75", "3", "0.00001"]
    assert format_number(np.float32(0.1)) == "0.1"
    assert float(format_number(0.1 + 0.2)) == 0.1 + 0.2


def test_image_modes_write_their_keys():
    settings = {
        "mode": "inpaint",
        "prompt": "a dog",
        "steps": 10,
        "sampler": "ddim",
        "eta": 0.5,
        "strength": 0.75,
        "clip_skip": 2,
        "mask_blur": 4,
        "only_masked": True,
        "padding": 32,
        "fill": "latent_noise",
    }
    assert format_infotext(settings) == (
        "a dog\nSteps: 10, Sampler: DDIM, Denoising strength: 0.75, Clip skip: 2, Eta DDIM: 0.5, Mask blur: 4, "
        "Inpaint area: Only masked, Masked area padding: 32, Masked content: latent noise"
    )
    back = settings_from_infotext(format_infotext(settings))
    assert {k: back[k] for k in settings if k != "mode"} == {k: v for k, v in settings.items() if k != "mode"}
    # Keys that mean nothing for the mode, or "off", are left out.
    plain = format_infotext({**settings, "mode": "img2img", "only_masked": False, "eta": 0.0, "clip_skip": 1})
    assert plain == "a dog\nSteps: 10, Sampler: DDIM, Denoising strength: 0.75"
    assert format_infotext({"mode": "upscale", "steps": 20, "strength": 0.2, "upscale": 4.0}) == (
        "Steps: 20, Denoising strength: 0.2, Hires upscale: 4"
    )


def test_name_tables_cover_every_sampler_and_schedule():
    assert set(A1111_SAMPLER_NAMES) == set(SAMPLERS)
    assert set(A1111_SCHEDULE_NAMES) == set(SCHEDULE_TYPES)


@pytest.mark.parametrize("schedule", sorted(A1111_SCHEDULE_NAMES))
@pytest.mark.parametrize("sampler", sorted(A1111_SAMPLER_NAMES))
def test_round_trip(sampler, schedule):
    settings = {**CAT, "sampler": sampler, "schedule": schedule, "eta": 0.25, "prompt": "a\ncafé ☕, 1girl"}
    back = settings_from_infotext(format_infotext(settings))
    expected = {k: v for k, v in settings.items() if k not in ("mode", "strength", "clip_skip", "version", "eta")}
    if sampler == "ddim":
        expected["eta"] = 0.25
    assert back == expected


def test_parse_real_a1111_text():
    parsed = parse_infotext(A1111_TEXT)
    assert parsed["prompt"] == "masterpiece, best quality, a castle on a hill\nat sunset, (detailed:1.2)"
    assert parsed["negative_prompt"] == "lowres, bad anatomy\nworst quality"
    assert parsed["parameters"]["Lora hashes"] == "a: 123, b: 456"
    assert parsed["parameters"]["Version"] == "v1.6.0"
    assert settings_from_infotext(A1111_TEXT) == {
        "prompt": parsed["prompt"],
        "negative_prompt": parsed["negative_prompt"],
        "steps": 30,
        "sampler": "dpmpp_2m",
        "schedule": "karras",
        "guidance_scale": 7.0,
        "seed": 123456,
        "width": 512,
        "height": 768,
        "model_hash": "6ce0161689",
        "model_name": "v1-5-pruned-emaonly",
        "lora_hashes": {"a": "123", "b": "456"},
    }


@pytest.mark.parametrize(
    "name, schedule_type, expected",
    [
        ("Euler a", None, ("euler_a", "default")),
        ("DPM2 a Karras", None, ("dpm2_a", "karras")),
        ("DPM++ 2M SDE Exponential", None, ("dpmpp_2m_sde", "exponential")),
        ("DPM++ SDE", "Karras", ("dpmpp_sde", "karras")),
        ("UniPC", "Automatic", ("unipc", "default")),
    ],
)
def test_a1111_sampler_names(name, schedule_type, expected):
    text = (
        f"p\nSteps: 20, Sampler: {name}, " + (f"Schedule type: {schedule_type}, " if schedule_type else "") + "Seed: 1"
    )
    settings = settings_from_infotext(text)
    assert (settings["sampler"], settings["schedule"]) == expected


def test_unknown_sampler_or_schedule_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown sampler 'Restart'") as e:
        settings_from_infotext("p\nSteps: 20, Sampler: Restart, Seed: 1")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown schedule type 'Polyexponential'"):
        settings_from_infotext("p\nSteps: 20, Sampler: Euler, Schedule type: Polyexponential")
    with pytest.raises(ValueError, match="'Steps' is not an integer"):
        settings_from_infotext("p\nSteps: many, Sampler: Euler, Seed: 1")


def test_prompt_only_text_has_no_parameters():
    assert parse_infotext("a cat, sitting\non a mat") == {
        "prompt": "a cat, sitting\non a mat",
        "negative_prompt": "",
        "parameters": {},
    }
    assert parse_infotext("Negative prompt: x\nSteps: 1, Seed: 2, CFG scale: 3")["prompt"] == ""


def test_model_hash(tmp_path):
    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)  # spans several read blocks
    file = tmp_path / "model.safetensors"
    file.write_bytes(data)
    assert model_hash(file) == hashlib.sha256(data).hexdigest()[:10]
    assert model_hash(None) is None

    folder = tmp_path / "converted"
    for name, content in [("vae/params.safetensors", b"v"), ("unet/params.safetensors", b"u"), ("config.json", b"c")]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    assert model_hash(folder) == hashlib.sha256(b"uv").hexdigest()[:10]  # unet/ sorts before vae/
    (tmp_path / "empty").mkdir()
    assert model_hash(tmp_path / "empty") is None


def test_png_texts_round_trip(tmp_path):
    settings = {**CAT, "prompt": "café ☕, naïve: 日本", "negative_prompt": "ugly,\nbad"}
    texts = {PARAMETERS_KEY: format_infotext(settings), SETTINGS_KEY: json.dumps(settings, sort_keys=True)}
    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(2)]
    paths = save_pngs(images, tmp_path, [5, 6], texts=[texts, {PARAMETERS_KEY: "other"}])
    assert [p.name for p in paths] == ["00000-5.png", "00001-6.png"]
    assert read_png_texts(paths[0]) == texts
    assert read_png_texts(paths[1]) == {PARAMETERS_KEY: "other"}
    assert json.loads(read_png_texts(paths[0])[SETTINGS_KEY]) == settings
    assert settings_from_infotext(read_png_texts(paths[0])[PARAMETERS_KEY])["prompt"] == settings["prompt"]
    assert np.array_equal(np.asarray(Image.open(paths[1])), np.asarray(images[1]))


def test_read_png_texts_errors(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.txt is not a PNG image$") as e:
        read_png_texts(text_file)
    assert "\n" not in str(e.value)
    jpeg = tmp_path / "photo.jpg"
    Image.new("RGB", (4, 4)).save(jpeg)
    with pytest.raises(ValueError, match="is not a PNG image"):
        read_png_texts(jpeg)
    with pytest.raises(FileNotFoundError):
        read_png_texts(tmp_path / "missing.png")


def test_default_schedule_is_written_as_the_a1111_type_that_walks_the_same_timesteps():
    """Never "Automatic", which AUTOMATIC1111 1.9+ reads as the sampler's own default (Karras for DPM++ 2M)."""
    for sampler in A1111_SAMPLER_NAMES:
        text = format_infotext({"prompt": "p", "steps": 20, "sampler": sampler, "schedule": "default"})
        assert "Schedule type: DDIM," in text + ",", text  # SD's leading spacing: timesteps 951, 901, ..., 1
        assert "Automatic" not in text
        for schedule in ("default", "karras", "exponential"):
            for spacing in ("leading", "linspace", "trailing"):
                settings = {"prompt": "p", "steps": 20, "sampler": sampler, "schedule": schedule}
                read = settings_from_infotext(format_infotext(settings, spacing))
                assert (read["sampler"], read["schedule"]) == (sampler, schedule), (sampler, schedule, spacing)
    assert "Schedule type: Uniform" in format_infotext({"sampler": "euler", "schedule": "default"}, "linspace")
    assert "Schedule type: SGM Uniform" in format_infotext({"sampler": "euler", "schedule": "default"}, "trailing")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("DPM++ 2M", "karras"),
        ("DPM++ SDE", "karras"),
        ("DPM2", "karras"),
        ("DPM2 a", "karras"),
        ("DPM++ 2S a", "karras"),
        ("DPM++ 2M SDE", "exponential"),
        ("Euler", "default"),
        ("Euler a", "default"),
        ("DDIM", "default"),
    ],
)
def test_automatic_reads_as_what_a1111_runs_for_the_sampler(name, expected):
    read = settings_from_infotext(f"p\nSteps: 20, Sampler: {name}, Schedule type: Automatic, Seed: 1")
    assert read["schedule"] == expected
    # With no schedule type at all, the sampler walks the model's timesteps (before 1.9 and since).
    assert settings_from_infotext(f"p\nSteps: 20, Sampler: {name}, Seed: 1")["schedule"] == "default"
