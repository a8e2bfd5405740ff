"""The shapes data: captions, splits, rendering, the evaluator on clean and degraded images, the writer, the script."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sd_jax import shapes

ROOT = Path(__file__).resolve().parents[1]
PER_CAPTION = 12  # 12 x 90 = 1080 evaluator images


def test_caption_splits():
    assert len(shapes.ALL_CAPTIONS) == len(set(shapes.ALL_CAPTIONS)) == 90
    assert len(shapes.HELD_OUT) == len(set(shapes.HELD_OUT)) == 6
    assert set(shapes.HELD_OUT) <= set(shapes.ALL_CAPTIONS)
    assert shapes.TRAIN_CAPTIONS == tuple(c for c in shapes.ALL_CAPTIONS if c not in shapes.HELD_OUT)
    assert len(shapes.TRAIN_CAPTIONS) == 84
    # Training sees every colour, shape and background.
    seen = [shapes.parse_caption(c) for c in shapes.TRAIN_CAPTIONS]
    for i, names in enumerate((shapes.COLOURS, shapes.SHAPES, shapes.COLOURS)):
        assert {s[i] for s in seen} == set(names)


def test_caption_round_trip_and_bad_captions():
    for text in shapes.ALL_CAPTIONS:
        assert shapes.caption(*shapes.parse_caption(text)) == text
    assert shapes.parse_caption("a blue square on a yellow background") == ("blue", "square", "yellow")
    bad = [
        "a red circle on a red background",
        "a purple circle on a red background",
        "a red hexagon on a blue background",
        "a red circle",
        "a red circle on a blue  background",
        "A red circle on a blue background",
        "the red circle on a blue background",
    ]
    for text in bad:
        with pytest.raises(ValueError):
            shapes.parse_caption(text)
    with pytest.raises(ValueError, match="both red"):
        shapes.caption("red", "circle", "red")


def test_colours_far_apart():
    rgb = np.array([shapes.RGB[c] for c in shapes.COLOURS], float)
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert distances[~np.eye(len(rgb), dtype=bool)].min() > 150


@pytest.mark.parametrize("size", [32, 64, 100])
def test_render_is_deterministic_inside_its_box_with_exact_flat_colours(size):
    low, high = int(np.ceil(0.3 * size)), int(0.6 * size)
    sides = set()
    for i, text in enumerate(shapes.ALL_CAPTIONS):
        colour, shape, background = shapes.parse_caption(text)
        image = shapes.render(colour, shape, background, size, np.random.default_rng(i))
        assert image.dtype == np.uint8 and image.shape == (size, size, 3)
        np.testing.assert_array_equal(image, shapes.render(colour, shape, background, size, np.random.default_rng(i)))
        fg, bg = np.array(shapes.RGB[colour]), np.array(shapes.RGB[background])
        drawn = (image != bg).any(-1)
        rows, cols = np.flatnonzero(drawn.any(1)), np.flatnonzero(drawn.any(0))
        height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert low <= height <= high and height == width, (text, height, width)
        sides.add(height)
        # Outside the box: the background exactly; inside: the shape's colour exactly where it is solid,
        # elsewhere blends on the line between the two.
        centre_y = rows[0] + (3 * height // 4 if shape == "triangle" else height // 2)
        np.testing.assert_array_equal(image[centre_y, cols[0] + width // 2], fg)
        solid = (image == fg).all(-1).sum() / (height * width)
        assert solid > {"square": 0.7, "circle": 0.5, "triangle": 0.25}[shape], (text, solid)
        t = (image - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg))
        blend = bg + t[..., None] * (fg - bg)
        assert np.abs(image - blend).max() <= 1 and t.min() >= -0.01 and t.max() <= 1.01
    assert len(sides) > 5  # the size varies
    assert shapes.render("red", "circle", "blue", size, np.random.default_rng(0)).tolist() != (
        shapes.render("red", "circle", "blue", size, np.random.default_rng(1)).tolist()
    )


def test_render_rejects_bad_names():
    with pytest.raises(ValueError):
        shapes.render("red", "circle", "red", 64, np.random.default_rng(0))
    with pytest.raises(ValueError):
        shapes.render("red", "oval", "blue", 64, np.random.default_rng(0))


@pytest.fixture(scope="module")
def ground_truth():
    captions = [shapes.ALL_CAPTIONS[i % 90] for i in range(PER_CAPTION * 90)]
    images = [
        shapes.render(*shapes.parse_caption(c), 64, np.random.default_rng([7, i])) for i, c in enumerate(captions)
    ]
    return images, captions


def _degrade(image: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    """What a small diffusion model's images look like next to the ground truth: soft, noisy, low-detail."""
    picture = Image.fromarray(image)
    if how in ("blur", "all"):
        picture = picture.filter(ImageFilter.GaussianBlur(1))
    if how in ("resize", "all"):
        picture = picture.resize((32, 32), Image.BILINEAR).resize((64, 64), Image.BILINEAR)
    pixels = np.asarray(picture, np.float32)
    if how in ("noise", "all"):
        pixels = pixels + rng.normal(0, 8, pixels.shape)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


# Clean and with all three degradations: every image; one degradation at a time: every third (time).
@pytest.mark.parametrize("how", ["clean", "all", "blur", "noise", "resize"])
def test_evaluator_reads_ground_truth(ground_truth, how):
    images, captions = ground_truth
    rng = np.random.default_rng(0)
    if how in ("blur", "noise", "resize"):
        images, captions = images[::3], captions[::3]
    if how != "clean":
        images = [_degrade(image, how, rng) for image in images]
    result = shapes.score(images, captions)
    print(f"\nevaluator on {result['count']} 64x64 images, {how}: {result}")
    assert result["count"] >= (1000 if how in ("clean", "all") else 300)
    for key in ("colour", "shape", "background", "all"):
        assert result[key] >= 0.99, (how, result)


def test_evaluator_other_sizes_and_no_shape():
    for i, size in enumerate((32, 48, 256)):
        for text in shapes.ALL_CAPTIONS[i::9]:
            image = shapes.render(*shapes.parse_caption(text), size, np.random.default_rng(i))
            assert shapes.evaluate(image) == shapes.parse_caption(text), (size, text)
    image = shapes.render("white", "triangle", "black", 64, np.random.default_rng(3))
    assert shapes.evaluate(Image.fromarray(image)) == ("white", "triangle", "black")
    assert shapes.evaluate(np.concatenate([image, image[:, :16]], axis=1)) == ("white", "triangle", "black")
    assert shapes.evaluate(np.full((40, 64, 3), shapes.RGB["green"], np.uint8)) == (None, None, "green")
    with pytest.raises(ValueError, match="at least 32"):
        shapes.evaluate(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        shapes.evaluate(np.zeros((64, 64), np.uint8))


def test_score_counts_each_attribute():
    images = [shapes.render("red", "square", "blue", 64, np.random.default_rng(i)) for i in range(4)]
    captions = ["a red square on a blue background", "a red circle on a blue background"] * 2
    assert shapes.score(images, captions) == {"colour": 1.0, "shape": 0.5, "background": 1.0, "all": 0.5, "count": 4}
    with pytest.raises(ValueError):
        shapes.score(images, captions[:3])


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_write_dataset_pairs_resume_and_determinism(tmp_path):
    captions = shapes.TRAIN_CAPTIONS[:3]
    first = tmp_path / "a"
    assert shapes.write_dataset(first, captions, 2, 32, 5, progress=False) == 6
    files = _files(first)
    assert sorted(files) == [f"{i:06d}.{ext}" for i in range(6) for ext in ("png", "txt")]
    for i in range(6):
        text = files[f"{i:06d}.txt"].decode()
        assert text == captions[i % 3]
        image = np.asarray(Image.open(first / f"{i:06d}.png"))
        assert image.shape == (32, 32, 3)
        assert shapes.evaluate(image) == shapes.parse_caption(text)
    # Complete: nothing to do. Same arguments elsewhere: the same bytes.
    assert shapes.write_dataset(first, captions, 2, 32, 5, progress=False) == 0
    assert _files(first) == files
    assert shapes.write_dataset(tmp_path / "b", captions, 2, 32, 5, progress=False) == 6
    assert _files(tmp_path / "b") == files
    # A killed run (an image without its caption, a missing image) resumes to the same files; more per caption
    # extends the set without touching what is there.
    (first / "000001.txt").unlink()
    (first / "000004.png").unlink()
    assert shapes.write_dataset(first, captions, 2, 32, 5, progress=False) == 2
    assert _files(first) == files
    assert shapes.write_dataset(first, captions, 3, 32, 5, progress=False) == 3
    assert {k: v for k, v in _files(first).items() if k in files} == files
    assert shapes.write_dataset(tmp_path / "c", captions, 2, 32, 6, progress=False) == 6
    assert _files(tmp_path / "c") != files
    with pytest.raises(ValueError, match="another dataset"):
        shapes.write_dataset(first, shapes.TRAIN_CAPTIONS[3:6], 2, 32, 5, progress=False)


def _run(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "scripts/make_shapes.py", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_make_shapes_script(tmp_path):
    result = _run(f"--output_dir={tmp_path}", "--per_caption=1", "--size=32", "--seed=3")
    assert result.returncode == 0, result.stderr
    assert "wrote 84 of 84" in result.stdout
    captions = [p.read_text() for p in sorted(tmp_path.glob("*.txt"))]
    assert captions == list(shapes.TRAIN_CAPTIONS)
    assert len(list(tmp_path.glob("*.png"))) == 84
    bad = _run(f"--output_dir={tmp_path}", "--per_caption=0", "--include_held_out")
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == [
        "error: per_caption must be at least 1, got 0"
    ]
