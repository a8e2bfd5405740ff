"""The shipped default model (trained from scratch on the shapes data), read back by the deterministic evaluator:
text to image over the training captions and the held-out ones, and the editing modes."""

import numpy as np
import pytest
from PIL import Image

import sd_jax
from sd_jax import shapes

# The default sampler (DDIM), 20 steps, classifier-free guidance 7.5, at the model's native 64x64.
SETTINGS = {"steps": 20}


@pytest.fixture(scope="module")
def pipe():
    return sd_jax.load()


# What the shipped weights score (BENCHMARKS.md), as floors a change of the model or the pipeline must keep. The
# issue's targets are 90% (training captions) and 75% (held out) for all three attributes; the shipped model reads
# back 97.9% and 95.8%, colours and backgrounds 100%.
TRAIN_FLOORS = {"colour": 0.97, "background": 0.97, "shape": 0.90, "all": 0.90}
HELD_OUT_FLOORS = {"colour": 0.95, "background": 0.95, "shape": 0.75, "all": 0.75}


def test_default_model_draws_the_training_captions(pipe):
    """The 84 training captions x seeds 0-3, read back by the evaluator."""
    result = shapes.score_model(pipe, shapes.TRAIN_CAPTIONS, range(4), **SETTINGS)
    print(f"training captions: {result}")
    assert result["count"] == 336
    for attribute, floor in TRAIN_FLOORS.items():
        assert result[attribute] >= floor, (attribute, result)


def test_default_model_composes_held_out_captions(pipe):
    """The 6 captions never seen in training (each word seen elsewhere in other combinations)."""
    result = shapes.score_model(pipe, shapes.HELD_OUT, range(4), **SETTINGS)
    print(f"held-out captions: {result}")
    for attribute, floor in HELD_OUT_FLOORS.items():
        assert result[attribute] >= floor, (attribute, result)


def test_img2img_recolours_a_circle(pipe):
    image = shapes.render("red", "circle", "white", 64, np.random.default_rng(0))
    assert shapes.evaluate(image) == ("red", "circle", "white")
    results = []
    for seed in range(4):
        out = pipe.img2img(
            "a blue circle on a white background", Image.fromarray(image), strength=0.8, seed=seed, **SETTINGS
        )[0]
        results.append(shapes.evaluate(np.asarray(out)))
    print(f"img2img red -> blue circle: {results}")
    # A blue circle on the kept white background in every seed.
    assert results == [("blue", "circle", "white")] * 4


def test_inpainting_puts_the_prompted_shape_in_the_box_and_keeps_the_rest(pipe):
    background = np.zeros((64, 64, 3), np.uint8)
    background[:] = shapes.RGB["blue"]
    background[:, :4] = shapes.RGB["white"]  # a strip the mask's blur never reaches: must survive byte for byte
    mask = np.zeros((64, 64), np.uint8)
    results = []
    mask[20:44, 20:44] = 255  # the 4-pixel blur (a Gaussian) reaches ~12 pixels: the border strips stay exact
    for seed in range(4):
        out = np.asarray(
            pipe.inpaint(
                "a yellow square on a blue background",
                Image.fromarray(background),
                Image.fromarray(mask),
                seed=seed,
                **SETTINGS,
            )[0]
        )
        np.testing.assert_array_equal(out[:, :4], background[:, :4])
        np.testing.assert_array_equal(out[:2], background[:2])
        results.append(shapes.evaluate(out))
    print(f"inpainting a yellow square: {results}")
    # The background is kept every time and the prompted colour lands in the box in 3 of 4 seeds (the fourth takes
    # the white of the kept strip); the shape in a 24-pixel box comes out round in 3 of 4 (BENCHMARKS.md).
    assert all(bg == "blue" for _, _, bg in results)
    assert sum(colour == "yellow" for colour, _, _ in results) >= 3


def test_outpainting_extends_the_background(pipe):
    image = shapes.render("red", "triangle", "green", 64, np.random.default_rng(1))
    out = np.asarray(
        pipe.outpaint("a red triangle on a green background", Image.fromarray(image), right=32, seed=0, **SETTINGS)[0]
    )
    assert out.shape == (64, 96, 3)
    np.testing.assert_array_equal(out[:, :48], image[:, :48])  # beyond the 8-pixel seam: kept exactly
    new = out[:, 72:].reshape(-1, 3).astype(np.float32)
    palette = np.array([shapes.RGB[c] for c in shapes.COLOURS], np.float32)
    nearest = np.argmin(((new[:, None] - palette[None]) ** 2).sum(-1), axis=1)
    share = np.mean(nearest == shapes.COLOURS.index("green"))
    print(f"outpainted area nearest to green: {share:.3f}")
    assert share >= 0.9
