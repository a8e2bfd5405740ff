"""End to end: img2img, inpainting and outpainting against diffusers' pipelines on the same random weights, and
the behaviour of the editing modes (limits of strength, exact preservation of kept pixels, tiling, bad inputs).

diffusers samples the VAE's latent distribution with its generator where sd_jax takes the mean, and draws the
img2img noise itself (its img2img has no `latents` argument); the parity tests make diffusers take the mean and
hand it our noise (see `argmax_encode` and `_fixed_noise`).

Every image is 32x32 (4x4 latents) unless said otherwise, so that each (sampler, mode) compiles once per model.
"""

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import sd_jax
from sd_jax import editing, tiling
from sd_jax.settings import GenerationSettings
from tests.tiny_models import save_diffusers_pipeline, tiny_config

PROMPT = "a photo of a cat"
NEGATIVE = "blurry"
SIZE = 32


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(diffusers StableDiffusionPipeline, sd_jax pipeline) of one random tiny SD 1.x model."""
    folder = tmp_path_factory.mktemp("sd1")
    reference = save_diffusers_pipeline(tiny_config("sd1"), folder)
    return reference, sd_jax.load(folder)


@pytest.fixture(scope="module")
def sd1_inpainting(tmp_path_factory):
    """(diffusers StableDiffusionInpaintPipeline, sd_jax pipeline) of a random tiny 9-channel inpainting model."""
    folder = tmp_path_factory.mktemp("sd1_inpainting")
    reference = save_diffusers_pipeline(tiny_config("sd1_inpainting"), folder)
    return reference, sd_jax.load(folder)


@pytest.fixture
def argmax_encode(monkeypatch):
    """Makes diffusers' img2img and inpaint pipelines encode with the latent distribution's mean, as sd_jax does."""
    from diffusers.pipelines.stable_diffusion import (
        pipeline_stable_diffusion_img2img,
        pipeline_stable_diffusion_inpaint,
    )

    for module in (pipeline_stable_diffusion_img2img, pipeline_stable_diffusion_inpaint):
        monkeypatch.setattr(
            module, "retrieve_latents", functools.partial(module.retrieve_latents, sample_mode="argmax")
        )


def _fixed_noise(monkeypatch, module, noise: np.ndarray) -> list:
    """Makes `module.randn_tensor` return `noise` (NCHW); returns the list of shapes it was asked for."""
    calls = []

    def randn_tensor(shape, **kwargs):
        calls.append(tuple(shape))
        assert tuple(shape) == noise.shape
        return torch.from_numpy(noise.copy())

    monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    return calls


def _random_image(seed: int, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _unit_noise(seed: int, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, height // 8, width // 8)).astype(np.float32)


def _pixels(images) -> np.ndarray:
    """(B, H, W, 3) uint8 from a list of PIL images or a uint8 array."""
    if isinstance(images, np.ndarray):
        return images
    return np.stack([np.asarray(im) for im in images])


def _assert_matches(what: str, ours, expected: np.ndarray) -> None:
    """Compares our uint8 images with diffusers' float images in [0, 1] (output_type="np"), within 2 / 255."""
    expected = (np.asarray(expected) * 255).round().astype(np.uint8)
    diff = np.abs(_pixels(ours).astype(int) - expected.astype(int))
    print(f"{what}: max abs pixel difference {diff.max()} / 255, mean {diff.mean():.4f}")
    # The images are not trivially flat, so the comparison means something.
    assert expected.std() > 10
    # Both sides run in float32; the images agree to float32 rounding, at most 2 levels of 255.
    assert diff.max() <= 2


def _twin_scheduler(pipe, name: str, extra: dict):
    import diffusers

    return getattr(diffusers, name).from_config(dict(pipe.config.scheduler), **extra)


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers

IMG2IMG_TWINS = {
    "ddim": ("DDIMScheduler", {}, "default"),
    "euler": ("EulerDiscreteScheduler", {}, "default"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "karras"),
}


@pytest.mark.parametrize("sampler", sorted(IMG2IMG_TWINS))
def test_img2img_matches_diffusers(sd1, argmax_encode, monkeypatch, sampler):
    import diffusers
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img

    reference, pipe = sd1
    name, extra, schedule = IMG2IMG_TWINS[sampler]
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**reference.components)
    img2img.scheduler = _twin_scheduler(pipe, name, extra)
    image = Image.fromarray(_random_image(0))
    noise = _unit_noise(1)
    calls = _fixed_noise(monkeypatch, pipeline_stable_diffusion_img2img, noise)
    kwargs = dict(negative_prompt=NEGATIVE, strength=0.6, guidance_scale=7.5)
    with torch.no_grad():
        expected = img2img(PROMPT, image=image, num_inference_steps=6, output_type="np", **kwargs).images
    assert calls == [noise.shape]  # diffusers did add our noise
    ours = pipe.img2img(PROMPT, image, steps=6, sampler=sampler, schedule=schedule, latents=noise, **kwargs)
    _assert_matches(f"img2img {sampler} ({schedule}), strength 0.6", ours, expected)


def _inpaint_inputs():
    """A random image and a rectangular mask that is not aligned to the 8x8 latent blocks."""
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[5:21, 10:27] = 1.0
    return _random_image(2), mask


def _diffusers_inpaint(reference, image: np.ndarray, mask: np.ndarray, strength: float, noise, monkeypatch):
    """diffusers' StableDiffusionInpaintPipeline output (B, H, W, 3) in [0, 1], 6 steps, starting from `noise`."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint

    if strength == 1.0:
        # At strength 1 diffusers takes `latents` as the pure noise it starts from.
        start = dict(latents=torch.from_numpy(noise.copy()))
    else:
        # Below strength 1 a given `latents` would replace the noised image (diffusers then ignores the image), so
        # the noise that add_noise mixes into the image latents goes in through randn_tensor instead.
        calls = _fixed_noise(monkeypatch, pipeline_stable_diffusion_inpaint, noise)
        start = {}
    with torch.no_grad():
        expected = reference(
            PROMPT,
            image=Image.fromarray(image),
            mask_image=Image.fromarray((mask * 255).astype(np.uint8)),
            negative_prompt=NEGATIVE,
            height=SIZE,
            width=SIZE,
            strength=strength,
            num_inference_steps=6,
            output_type="np",
            **start,
        ).images
    if strength < 1.0:
        assert calls == [noise.shape]  # diffusers did add our noise
    return expected


def _inpaint_raw(pipe, image, mask, noise, **options):
    """The model's pixels before paste-back, for the mask as given (no blur)."""
    settings = GenerationSettings(mode="inpaint", prompt=PROMPT, negative_prompt=NEGATIVE, mask_blur=0.0, **options)
    prepared = pipe.prepare(settings, Image.fromarray(image), mask, latents=noise)
    return pipe.sample(prepared.batch, prepared.static)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_model_matches_diffusers(sd1_inpainting, argmax_encode, monkeypatch, strength):

    reference, pipe = sd1_inpainting
    assert type(reference).__name__ == "StableDiffusionInpaintPipeline"
    reference.scheduler = _twin_scheduler(pipe, "DDIMScheduler", {})
    image, mask = _inpaint_inputs()
    noise = _unit_noise(3)
    expected = _diffusers_inpaint(reference, image, mask, strength, noise, monkeypatch)
    ours = _inpaint_raw(pipe, image, mask, noise, strength=strength, steps=6)
    _assert_matches(f"9-channel inpainting, strength {strength}", ours, expected)


@pytest.mark.parametrize(("sampler", "strength"), [("ddim", 1.0), ("euler", 1.0), ("ddim", 0.7), ("euler", 0.7)])
def test_blended_inpainting_matches_diffusers(sd1, argmax_encode, monkeypatch, sampler, strength):
    """An ordinary (4-channel) U-Net: diffusers' inpaint pipeline resets the known region after every step."""
    import diffusers

    reference, pipe = sd1
    name, extra, schedule = IMG2IMG_TWINS[sampler]
    inpaint = diffusers.StableDiffusionInpaintPipeline(**reference.components)
    assert inpaint.unet.config.in_channels == 4
    inpaint.scheduler = _twin_scheduler(pipe, name, extra)
    image = _random_image(4)
    # Aligned to the 8x8 latent blocks: diffusers' nearest-neighbour binarised latent mask and ours then agree.
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[8:24, 0:16] = 1.0
    noise = _unit_noise(5)
    expected = _diffusers_inpaint(inpaint, image, mask, strength, noise, monkeypatch)
    ours = _inpaint_raw(pipe, image, mask, noise, strength=strength, steps=6, sampler=sampler, schedule=schedule)
    _assert_matches(f"4-channel inpainting {sampler}, strength {strength}", ours, expected)


# ---------------------------------------------------------------------------------------------------------------
# Limits of strength, and every sampler


def _vae_round_trip(pipe, image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3): the image encoded (mean) and decoded by the pipeline's VAE."""
    vae = pipe.config.vae
    latents = pipe.encode_image(image)[None] / vae.scaling_factor + float(vae.shift_factor or 0.0)
    return (pipe.decode_latents(latents)[0] * 255).round().astype(np.uint8)


def test_img2img_strength_0_is_the_vae_round_trip(sd1):
    reference, pipe = sd1
    image = _random_image(6)
    ours = _pixels(pipe.img2img(PROMPT, Image.fromarray(image), strength=0.0, steps=4))[0]
    round_trip = _vae_round_trip(pipe, image)
    with torch.no_grad():
        pixels = torch.from_numpy(editing.to_model_range(image)).permute(2, 0, 1)[None]
        decoded = reference.vae.decode(reference.vae.encode(pixels).latent_dist.mode()).sample
    torch_trip = ((decoded[0].permute(1, 2, 0).numpy() / 2 + 0.5).clip(0, 1) * 255).round().astype(np.uint8)

    to_ours = np.abs(ours.astype(int) - round_trip.astype(int))
    to_torch = np.abs(ours.astype(int) - torch_trip.astype(int))
    to_input = np.abs(ours.astype(int) - image.astype(int))
    print(
        f"strength 0: max abs difference to the sd_jax VAE round trip {to_ours.max()} / 255, "
        f"to diffusers' {to_torch.max()} / 255 (mean {to_torch.mean():.4f}); "
        f"mean abs difference to the input {to_input.mean():.1f} / 255"
    )
    assert to_ours.max() <= 1
    assert to_torch.max() <= 2
    # No sampling happened, but a random VAE does not reproduce its input.
    assert to_input.mean() > 5


def test_img2img_strength_1_is_txt2img(sd1):
    _, pipe = sd1
    kwargs = dict(steps=4, seed=7)
    txt2img = _pixels(pipe.txt2img(PROMPT, height=SIZE, width=SIZE, **kwargs))
    for seed in (8, 9):  # two unrelated init images: at strength 1 their content is ignored
        img2img = _pixels(pipe.img2img(PROMPT, Image.fromarray(_random_image(seed)), strength=1.0, **kwargs))
        np.testing.assert_array_equal(img2img, txt2img)


def test_img2img_init_image_matters_below_strength_1(sd1):
    _, pipe = sd1
    first, second = (Image.fromarray(_random_image(seed)) for seed in (8, 9))
    kwargs = dict(steps=4, seed=7, strength=0.5)
    a = _pixels(pipe.img2img(PROMPT, first, **kwargs)).astype(int)
    b = _pixels(pipe.img2img(PROMPT, second, **kwargs)).astype(int)
    print(f"strength 0.5, two init images: mean abs difference {np.abs(a - b).mean():.1f} / 255")
    assert np.abs(a - b).mean() > 5


# Each sampler compiles its own img2img loop (~8-13 s on a 2-core CPU), so the pipeline runs one of each family;
# tests/test_img2img_entry.py checks all 13 entered mid-schedule on an exact Gaussian problem.
@pytest.mark.parametrize("sampler", ["ddim", "plms", "euler_a", "dpm2", "dpmpp_2m_sde", "unipc"])
def test_img2img_runs_with_every_sampler(sd1, sampler):
    _, pipe = sd1
    image = _random_image(10)
    kwargs = dict(steps=4, seed=3, sampler=sampler)
    out = _pixels(pipe.img2img(PROMPT, Image.fromarray(image), strength=0.5, **kwargs))[0].astype(int)
    trip = _pixels(pipe.img2img(PROMPT, Image.fromarray(image), strength=0.0, **kwargs))[0].astype(int)
    # Strength 0 runs no step, whatever the sampler (PLMS's schedule has one entry more than steps).
    assert np.abs(trip - _vae_round_trip(pipe, image)).max() <= 1
    print(f"img2img {sampler} at strength 0.5: std {out.std():.1f}, mean abs change {np.abs(out - trip).mean():.1f}")
    # A NaN anywhere in the latents spreads through the VAE and comes out as a constant image.
    assert out.std() > 10
    # Sampling ran.
    assert np.abs(out - trip).mean() > 2


# ---------------------------------------------------------------------------------------------------------------
# What inpainting and outpainting keep


def _corner_mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[0:8, 0:16] = 1.0
    return mask


def _assert_kept_and_repainted(what: str, out, image: np.ndarray, mask: np.ndarray, blur: float) -> None:
    out = _pixels(out)[0]
    assert out.shape == image.shape
    alpha = editing.blur_mask(mask, blur)
    kept = alpha == 0
    inside = mask == 1
    change = np.abs(out.astype(int) - image.astype(int))
    print(f"{what}: {kept.sum()} kept pixels, mean abs change inside the mask {change[inside].mean():.1f} / 255")
    assert kept.sum() > SIZE * SIZE // 4
    np.testing.assert_array_equal(out[kept], image[kept])
    assert change[inside].mean() > 5


@pytest.mark.parametrize("model", ["sd1", "sd1_inpainting"])
def test_inpaint_keeps_every_pixel_outside_the_blurred_mask(request, model):
    _, pipe = request.getfixturevalue(model)
    image, mask = _random_image(11), _corner_mask()
    out = pipe.inpaint(PROMPT, Image.fromarray(image), mask, mask_blur=4, steps=4)
    _assert_kept_and_repainted(f"{model} inpaint", out, image, mask, 4)


@pytest.mark.parametrize("model", ["sd1", "sd1_inpainting"])
def test_only_masked_inpaint_keeps_every_pixel_outside_the_blurred_mask(request, model):
    _, pipe = request.getfixturevalue(model)
    image, mask = _random_image(12), _corner_mask()
    out = pipe.inpaint(
        PROMPT, Image.fromarray(image), mask, mask_blur=4, only_masked=True, padding=8, height=SIZE, width=SIZE, steps=4
    )
    _assert_kept_and_repainted(f"{model} only-masked inpaint", out, image, mask, 4)


def test_outpaint_extends_the_canvas_and_keeps_the_interior(sd1):
    _, pipe = sd1
    image = _random_image(13, height=16, width=24)
    out = _pixels(pipe.outpaint(PROMPT, Image.fromarray(image), left=8, bottom=16, seam=8, steps=4))[0]
    assert out.shape == (16 + 16, 8 + 24, 3)
    # The original sits at canvas rows [0, 16) and columns [8, 32). Pixels at least `seam` = 8 pixels from the
    # extended sides (its left column and its bottom row) are kept: original rows [0, 8), columns [8, 24).
    np.testing.assert_array_equal(out[0:8, 16:32], image[0:8, 8:24])
    seam = np.abs(out[0:16, 8:32].astype(int) - image.astype(int)).mean()
    print(f"outpaint: mean abs change over the original's area {seam:.1f} / 255, new area std {out[16:].std():.1f}")
    # The seam and the new area were repainted.
    assert seam > 2
    assert out[16:].std() > 10


# ---------------------------------------------------------------------------------------------------------------
# Tiling


def test_img2img_tiled_path_equals_untiled_for_one_tile(sd1):
    """tile=True encodes and decodes through `sd_jax.tiling` on the host; a 32x32 image is one tile of each."""
    _, pipe = sd1
    image = Image.fromarray(_random_image(14))
    kwargs = dict(strength=0.6, steps=4, seed=5)
    tiled = _pixels(pipe.img2img(PROMPT, image, tile=True, **kwargs)).astype(int)
    fused = _pixels(pipe.img2img(PROMPT, image, tile=False, **kwargs)).astype(int)
    print(f"img2img tile=True vs tile=False (one tile): max abs difference {np.abs(tiled - fused).max()} / 255")
    assert np.abs(tiled - fused).max() <= 1


def test_img2img_tiled_path_uses_several_tiles(sd1, monkeypatch):
    """With small tiles patched in, tile=True goes through several VAE tiles and stays close to tile=False."""
    _, pipe = sd1
    image = Image.fromarray(_random_image(14))
    kwargs = dict(strength=0.6, steps=4, seed=5)
    fused = _pixels(pipe.img2img(PROMPT, image, tile=False, **kwargs)).astype(int)
    tiles = {"encode": 0, "decode": 0}

    def counted(name, fn):
        def run(x):
            tiles[name] += 1
            return fn(x)

        return run

    encode, decode = tiling.tiled_encode, tiling.tiled_decode
    # 16x16-pixel encoder tiles (2x2 latents) overlapping by 8, 2x2-latent decoder tiles overlapping by 1: 3x3 each.
    monkeypatch.setattr(
        tiling, "tiled_encode", lambda fn, x, **kw: encode(counted("encode", fn), x, **{**kw, "tile": 16, "overlap": 8})
    )
    monkeypatch.setattr(
        tiling, "tiled_decode", lambda fn, z, **kw: decode(counted("decode", fn), z, **{**kw, "tile": 2, "overlap": 1})
    )
    tiled = _pixels(pipe.img2img(PROMPT, image, tile=True, **kwargs)).astype(int)
    diff = np.abs(tiled - fused)
    print(
        f"img2img with 3x3 VAE tiles vs untiled: {tiles}, mean abs difference {diff.mean():.1f} / 255, max {diff.max()}"
    )
    assert tiles == {"encode": 9, "decode": 9}
    # Measured on CPU: mean 44.8 / 255. Tiles of 16x16 pixels are far from the real 512, and the random VAE is
    # sensitive to them (see the next test); the bound guards the scale.
    assert 0 < diff.mean() < 70


def test_tiled_vae_through_the_pipeline_is_close_to_untiled(sd1):
    """The pipeline's own jitted VAE functions in 5 x 8 tiles of a 192x128 image.

    The tiles are those of the 32x32 images above (32-pixel encoder tiles, 4-latent decoder tiles), so only the
    untiled references compile here.
    """
    _, pipe = sd1
    state = pipe.states["vae"]
    f = pipe.latent_factor
    y, x = np.mgrid[0:128, 0:192] / 64.0
    smooth = np.stack([np.sin(x + y), np.cos(2 * x - y), np.sin(3 * y)], axis=-1) * 100 + 128
    image = np.clip(smooth + np.random.default_rng(15).normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
    pixels = editing.to_model_range(image)[None]

    def encode(p):
        return pipe.vae.encode_mean(state, p)

    def decode(z):
        return pipe.vae.decode_raw(state, z)

    mean = np.asarray(encode(pixels))
    tiled_mean = tiling.tiled_encode(encode, pixels, tile=32, overlap=8, factor=f)
    encode_error = np.abs(tiled_mean - mean)
    print(
        f"tiled encode (32 px tiles, 8 px overlap): mean abs error {encode_error.mean():.4f}, "
        f"max {encode_error.max():.4f}, latent std {mean.std():.4f}"
    )
    images = np.asarray(decode(mean)) / 2 + 0.5
    tiled_images = tiling.tiled_decode(decode, mean, tile=4, overlap=1, factor=f) / 2 + 0.5
    decode_error = np.abs(tiled_images - images)
    print(
        f"tiled decode (4-latent tiles, 1 overlap): mean abs error {decode_error.mean():.4f}, "
        f"max {decode_error.max():.4f} in [0, 1] units, image std {images.std():.4f}"
    )
    assert tiled_mean.shape == mean.shape and tiled_images.shape == images.shape
    # Measured on CPU: encode mean 0.49 (max 3.56, latent std 0.61), decode mean 0.27 (max 1.84, image std 0.29).
    # As large as that because the tiles are tiny and the VAE random (see tests/test_tiling.py): each tile's
    # GroupNorm statistics differ from the image's. The bounds guard the scale; tests/test_tiling.py checks the
    # blending itself exactly on pixelwise functions.
    assert encode_error.mean() > 0 and decode_error.mean() > 0
    assert encode_error.mean() < 0.75 and decode_error.mean() < 0.4


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs


def _bad_calls(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    image = Image.fromarray(_random_image(16))
    mask = _corner_mask()
    return {
        "mask size": (
            lambda pipe: pipe.inpaint(PROMPT, image, mask[:24]),
            ValueError,
            "mask is 32x24 but the image is 32x32",
        ),
        "text file": (lambda pipe: pipe.img2img(PROMPT, text), ValueError, "is not an image file"),
        "missing file": (
            lambda pipe: pipe.img2img(PROMPT, tmp_path / "missing.png"),
            FileNotFoundError,
            "init image file not found",
        ),
        "strength below 0": (
            lambda pipe: pipe.img2img(PROMPT, image, strength=-0.1),
            ValueError,
            r"strength must be in \[0, 1\]",
        ),
        "strength above 1": (
            lambda pipe: pipe.inpaint(PROMPT, image, mask, strength=1.5),
            ValueError,
            r"strength must be in \[0, 1\]",
        ),
        "empty mask": (
            lambda pipe: pipe.inpaint(PROMPT, image, np.zeros((SIZE, SIZE), np.float32)),
            ValueError,
            "the mask is empty",
        ),
        "outpaint not a multiple of 8": (
            lambda pipe: pipe.outpaint(PROMPT, image, left=10),
            ValueError,
            "left=10 is not a multiple of 8",
        ),
        "outpaint nothing": (lambda pipe: pipe.outpaint(PROMPT, image), ValueError, "nothing to outpaint"),
        "unknown fill": (lambda pipe: pipe.inpaint(PROMPT, image, mask, fill="blur"), ValueError, "unknown fill"),
        "height only": (
            lambda pipe: pipe.img2img(PROMPT, image, height=SIZE),
            ValueError,
            "give both height and width",
        ),
    }


BAD_CALLS = (
    "mask size",
    "text file",
    "missing file",
    "strength below 0",
    "strength above 1",
    "empty mask",
    "outpaint not a multiple of 8",
    "outpaint nothing",
    "unknown fill",
    "height only",
)


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_inputs(sd1, tmp_path, case):
    _, pipe = sd1
    call, error, message = _bad_calls(tmp_path)[case]
    with pytest.raises(error, match=message):
        call(pipe)
