"""The scripts end to end on the tiny model (`--model=random:tiny`): PNG metadata, --from_png, the watermark, and
the editing scripts."""

import json

import numpy as np
import pytest
from PIL import Image

from sd_jax import infotext
from sd_jax.watermark import PAYLOAD_SD1, read_watermark
from tests.test_convert import run_script


def _one_png(result) -> str:
    assert result.returncode == 0, result.stderr
    paths = result.stdout.split()
    assert len(paths) == 1
    return paths[0]


def _errors(result) -> list[str]:
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def txt2img_png(tmp_path_factory):
    out = tmp_path_factory.mktemp("txt2img")
    args = [
        "scripts/txt2img.py",
        "--model=random:tiny",
        "--prompt=a (lighthouse:1.2) at dusk, BREAK oil painting",
        "--negative_prompt=blurry, [low quality]",
        # DWT-DCT carries the 136-bit payload reliably from 512 pixels on (at 256 a bit or two may flip).
        "--height=512",
        "--width=512",
        "--steps=2",
        "--sampler=dpmpp_2m",
        "--schedule=karras",
        "--guidance_scale=6.5",
        "--clip_skip=2",
        "--seed=11",
        f"--output_dir={out}",
    ]
    return _one_png(run_script(*args)), args


def test_png_carries_a1111_infotext_and_settings(txt2img_png):
    path, _ = txt2img_png
    texts = Image.open(path).text
    assert texts["parameters"] == (
        "a (lighthouse:1.2) at dusk, BREAK oil painting\n"
        "Negative prompt: blurry, [low quality]\n"
        "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 11, Size: 512x512, "
        "Model: tiny, Clip skip: 2, Version: sd_jax 0.1.0"
    )
    settings = json.loads(texts["sd_jax"])
    assert settings["sampler"] == "dpmpp_2m" and settings["seed"] == 11 and settings["clip_skip"] == 2
    # What AUTOMATIC1111-reading tools take from it.
    read = infotext.settings_from_infotext(texts["parameters"])
    assert (read["sampler"], read["schedule"], read["steps"], read["seed"]) == ("dpmpp_2m", "karras", 2, 11)


def test_watermark_decodes_from_the_output(txt2img_png):
    path, _ = txt2img_png
    assert read_watermark(Image.open(path), len(PAYLOAD_SD1)) == PAYLOAD_SD1


def test_from_png_regenerates_identical_pixels(txt2img_png, tmp_path):
    path, _ = txt2img_png
    again = _one_png(run_script("scripts/txt2img.py", f"--from_png={path}", f"--output_dir={tmp_path}"))
    assert again.endswith("-11.png")
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(path)))
    assert Image.open(again).text == Image.open(path).text


def test_nowatermark(txt2img_png, tmp_path):
    path, args = txt2img_png
    args = [a for a in args if not a.startswith("--output_dir")]
    plain = _one_png(run_script(*args, "--nowatermark", f"--output_dir={tmp_path}"))
    assert read_watermark(Image.open(plain), len(PAYLOAD_SD1)) != PAYLOAD_SD1
    marked, unmarked = np.asarray(Image.open(path), int), np.asarray(Image.open(plain), int)
    assert 0 < np.abs(marked - unmarked).mean() < 20  # invisible: a small change of every block


def test_from_png_of_a_non_png(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert _errors(run_script("scripts/txt2img.py", f"--from_png={text}", f"--output_dir={tmp_path / 'o'}")) == [
        f"error: {text} is not a PNG image"
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(folder / "image.png")
    mask = np.zeros((64, 48), np.uint8)
    mask[16:40, 8:32] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(mask[:32]).save(folder / "small_mask.png")
    Image.fromarray(np.zeros((64, 48), np.uint8)).save(folder / "empty_mask.png")
    (folder / "not_an_image.png").write_text("not an image")
    return folder


COMMON = ["--model=random:tiny", "--steps=2", "--prompt=a lighthouse", "--nowatermark"]


def test_img2img_script(inputs, tmp_path):
    path = _one_png(
        run_script(
            "scripts/img2img.py",
            f"--init_image={inputs / 'image.png'}",
            "--strength=0.5",
            *COMMON,
            f"--output_dir={tmp_path}",
        )
    )
    image = Image.open(path)
    assert image.size == (48, 64)
    assert "Denoising strength: 0.5" in image.text["parameters"]


def test_inpaint_script_keeps_unmasked_pixels(inputs, tmp_path):
    from sd_jax.editing import blur_mask

    path = _one_png(
        run_script(
            "scripts/inpaint.py",
            f"--init_image={inputs / 'image.png'}",
            f"--mask={inputs / 'mask.png'}",
            *COMMON,
            f"--output_dir={tmp_path}",
        )
    )
    out = np.asarray(Image.open(path))
    original = np.asarray(Image.open(inputs / "image.png"))
    keep = blur_mask(np.asarray(Image.open(inputs / "mask.png"), np.float32) / 255, 4) == 0
    np.testing.assert_array_equal(out[keep], original[keep])
    assert np.abs(out[~keep].astype(int) - original[~keep]).mean() > 5
    assert "Mask blur: 4" in Image.open(path).text["parameters"]


def test_outpaint_and_upscale_scripts(inputs, tmp_path):
    out = _one_png(
        run_script(
            "scripts/outpaint.py",
            f"--init_image={inputs / 'image.png'}",
            "--left=8",
            "--bottom=16",
            *COMMON,
            f"--output_dir={tmp_path}",
        )
    )
    extended = np.asarray(Image.open(out))
    assert extended.shape == (80, 56, 3)
    original = np.asarray(Image.open(inputs / "image.png"))
    # Away from the seam (8 pixels along the extended borders) the original is untouched.
    np.testing.assert_array_equal(extended[:56, 16:], original[:56, 8:])
    up = _one_png(
        run_script(
            "scripts/upscale.py",
            f"--init_image={inputs / 'image.png'}",
            "--scale=1.5",
            *COMMON,
            f"--output_dir={tmp_path}",
        )
    )
    assert Image.open(up).size == (72, 96)


@pytest.mark.parametrize(
    "script, args, message",
    [
        (
            "inpaint",
            ["--init_image={d}/image.png", "--mask={d}/small_mask.png"],
            "mask is 48x32 but the image is 48x64",
        ),
        ("inpaint", ["--init_image={d}/image.png", "--mask={d}/empty_mask.png"], "the mask is empty"),
        ("img2img", ["--init_image={d}/not_an_image.png"], "is not an image file"),
        ("img2img", ["--init_image={d}/missing.png"], "not found"),
        ("img2img", ["--init_image={d}/image.png", "--strength=1.5"], "strength must be in [0, 1], got 1.5"),
        ("outpaint", ["--init_image={d}/image.png", "--left=10"], "left=10 is not a multiple of 8"),
        ("outpaint", ["--init_image={d}/image.png"], "nothing to outpaint"),
        ("inpaint", ["--init_image={d}/image.png"], "--init_image and --mask are required"),
    ],
)
def test_editing_scripts_bad_input_is_one_line(inputs, tmp_path, script, args, message):
    out = tmp_path / "out"
    result = run_script(f"scripts/{script}.py", *[a.format(d=inputs) for a in args], *COMMON, f"--output_dir={out}")
    errors = _errors(result)
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not out.exists() or list(out.iterdir()) == []
