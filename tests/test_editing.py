"""Host-side image and mask preparation for img2img, inpainting and outpainting (sd_jax.editing)."""

import math

import numpy as np
import pytest
from PIL import Image

from sd_jax import editing


def random_image(rng, height=64, width=48):
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def distance_to_nonzero(mask):
    """Euclidean distance (H, W) from every pixel to the nearest nonzero pixel of a small mask, by brute force."""
    points = np.argwhere(mask > 0).astype(np.float64)
    grid = np.indices(mask.shape).reshape(2, -1).T.astype(np.float64)
    return np.sqrt(((grid[:, None, :] - points[None]) ** 2).sum(-1)).min(axis=1).reshape(mask.shape)


# ---------------------------------------------------------------------------------------------------------------
# load_image


def test_load_image_modes():
    rgb = Image.fromarray(np.full((4, 6, 3), 77, np.uint8))
    assert editing.load_image(rgb) is rgb
    assert np.asarray(editing.load_image(Image.new("L", (6, 4), 200))).tolist() == [[[200] * 3] * 6] * 4

    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, :3] = (200, 100, 50)
    rgba[0, :, 3] = (0, 255, 128)
    out = np.asarray(editing.load_image(Image.fromarray(rgba, "RGBA")))
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], (0, 0, 0))  # fully transparent: black, whatever colour was hidden
    np.testing.assert_array_equal(out[0, 1], (200, 100, 50))
    np.testing.assert_allclose(out[0, 2], np.array([200, 100, 50]) * 128 / 255, atol=1)

    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert np.asarray(editing.load_image(sixteen))[0, :, 0].tolist() == [0, 128, 255]  # scaled, not clipped

    palette = Image.new("P", (2, 2), 3)
    assert editing.load_image(palette).mode == "RGB"


def test_load_image_from_path(tmp_path):
    pixels = random_image(np.random.default_rng(0), 16, 8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = editing.load_image(tmp_path / "a.png")
    assert image.mode == "RGB" and image.size == (8, 16)
    np.testing.assert_array_equal(np.asarray(image), pixels)
    assert editing.load_image(str(tmp_path / "a.png")).size == (8, 16)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        editing.load_image(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("not pixels")
    with pytest.raises(ValueError, match=r"notes\.txt is not an image file"):
        editing.load_image(tmp_path / "notes.txt", what="init image")
    Image.fromarray(random_image(np.random.default_rng(0))).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.png is not an image file"):
        editing.load_image(tmp_path / "cut.png")
    with pytest.raises(ValueError, match="is a directory"):
        editing.load_image(tmp_path)
    with pytest.raises(TypeError):
        editing.load_image(3)


# ---------------------------------------------------------------------------------------------------------------
# load_mask


def test_load_mask_sources(tmp_path):
    values = np.zeros((8, 6), np.uint8)
    values[2:5, 1:4] = 255
    values[0, 0] = 51
    expected = values.astype(np.float32) / 255

    from_pil = editing.load_mask(Image.fromarray(values), (6, 8))
    assert from_pil.dtype == np.float32 and from_pil.shape == (8, 6)
    np.testing.assert_array_equal(from_pil, expected)

    Image.fromarray(values).save(tmp_path / "mask.png")
    np.testing.assert_array_equal(editing.load_mask(tmp_path / "mask.png", (6, 8)), expected)
    np.testing.assert_array_equal(editing.load_mask(values, (6, 8)), expected)
    np.testing.assert_array_equal(editing.load_mask(values[..., None], (6, 8)), expected)
    np.testing.assert_array_equal(editing.load_mask(np.repeat(values[..., None], 3, -1), (6, 8)), expected)
    np.testing.assert_array_equal(editing.load_mask(values == 255, (6, 8)), (values == 255).astype(np.float32))
    np.testing.assert_array_equal(editing.load_mask(expected.astype(np.float64), (6, 8)), expected)

    rgba = np.zeros((8, 6, 4), np.uint8)
    rgba[..., :3] = values[..., None]  # alpha 0 everywhere: the luminance still counts
    np.testing.assert_array_equal(editing.load_mask(Image.fromarray(rgba, "RGBA"), (6, 8)), expected)


def test_load_mask_errors(tmp_path):
    mask = np.ones((384, 512), np.float32)
    with pytest.raises(ValueError, match=r"^mask is 512x384 but the image is 512x512 \(width x height\)$"):
        editing.load_mask(mask, (512, 512))
    with pytest.raises(ValueError, match="^the mask is empty: nothing to repaint"):
        editing.load_mask(np.full((4, 4), 0.49, np.float32), (4, 4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        editing.load_mask(np.full((4, 4), 2.0), (4, 4))
    with pytest.raises(ValueError, match="2-D"):
        editing.load_mask(np.ones((2, 4, 4)), (4, 4))
    with pytest.raises(FileNotFoundError):
        editing.load_mask(tmp_path / "nope.png", (4, 4))
    (tmp_path / "mask.txt").write_text("white")
    with pytest.raises(ValueError, match="is not an image file"):
        editing.load_mask(tmp_path / "mask.txt", (4, 4))


# ---------------------------------------------------------------------------------------------------------------
# sizes


def test_round_size_and_check_multiple():
    assert editing.round_size(513, 770) == (512, 768)
    assert editing.round_size(5, 64) == (8, 64)
    assert editing.round_size(100, 100, multiple=64) == (64, 64)
    editing.check_multiple(512, 768)
    with pytest.raises(ValueError, match=r"^image is 513x512 \(width x height\): width 513 is not a multiple of 8"):
        editing.check_multiple(513, 512)
    with pytest.raises(ValueError, match="init image .* height 100 is not a multiple of 64"):
        editing.check_multiple(512, 100, 64, what="init image")
    with pytest.raises(ValueError, match="width 9 and height 10 are not multiples of 8"):
        editing.check_multiple(9, 10)
    with pytest.raises(ValueError):
        editing.round_size(0, 8)


# ---------------------------------------------------------------------------------------------------------------
# blur_mask


@pytest.mark.parametrize("radius", [0.5, 1.0, 2.5, 4.0, 7.0])
def test_blur_mask_leaves_far_pixels_exactly_zero(radius):
    rng = np.random.default_rng(1)
    mask = np.zeros((64, 80), np.float32)
    mask[rng.random(mask.shape) < 0.004] = 1.0
    mask[30:34, 40:50] = rng.random((4, 10))
    blurred = editing.blur_mask(mask, radius)
    assert blurred.dtype == np.float32 and blurred.shape == mask.shape
    assert blurred.min() >= 0 and blurred.max() <= 1
    far = distance_to_nonzero(mask) > 3 * radius + 2
    assert far.any() and not blurred[far].any()
    near = distance_to_nonzero(mask) <= 1
    assert (blurred[near] > 0).all()


def test_blur_mask_profile_is_gaussian():
    radius = 4.0
    mask = np.zeros((16, 64), np.float32)
    mask[:, :32] = 1
    profile = editing.blur_mask(mask, radius)[8]
    np.testing.assert_array_equal(editing.blur_mask(mask, radius), np.broadcast_to(profile, mask.shape))
    centres = np.arange(64) + 0.5 - 32  # signed distance of each pixel centre past the edge
    expected = np.array([0.5 * math.erfc(d / (radius * math.sqrt(2))) for d in centres])
    np.testing.assert_allclose(profile, expected, atol=0.02)
    assert profile[0] == 1 and profile[-1] == 0  # the border is replicated, not darkened


def test_blur_mask_radius_zero_and_errors():
    mask = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    same = editing.blur_mask(mask, 0)
    np.testing.assert_array_equal(same, mask)
    assert same is not mask
    with pytest.raises(ValueError, match="radius"):
        editing.blur_mask(mask, -1)


# ---------------------------------------------------------------------------------------------------------------
# latent_mask, to_model_range, masked_image (against PyTorch / diffusers' formulas)


@pytest.mark.parametrize(("height", "width"), [(64, 48), (40, 72), (8, 8)])
def test_latent_mask_matches_torch(height, width):
    torch = pytest.importorskip("torch")
    mask = np.random.default_rng(height).random((height, width)).astype(np.float32)
    binary = (mask >= 0.5).astype(np.float32)  # diffusers binarises before interpolating
    size = (height // 8, width // 8)
    nearest = torch.nn.functional.interpolate(torch.from_numpy(binary)[None, None], size=size, mode="nearest")
    np.testing.assert_array_equal(editing.latent_mask(mask, binary=True), nearest[0, 0].numpy())
    area = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None], size=size, mode="area")
    soft = editing.latent_mask(mask, binary=False)
    assert soft.dtype == np.float32 and soft.shape == size
    np.testing.assert_allclose(soft, area[0, 0].numpy(), rtol=0, atol=1e-6)


def test_latent_mask_errors():
    with pytest.raises(ValueError, match="mask is 60x64 .* width 60 is not a multiple of 8"):
        editing.latent_mask(np.ones((64, 60), np.float32), binary=True)


def test_to_model_range_matches_diffusers_formula():
    torch = pytest.importorskip("torch")
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    out = editing.to_model_range(pixels)
    assert out.dtype == np.float32 and out[0, 0, 0] == -1 and out[-1, -1, 0] == 1
    # VaeImageProcessor: numpy float32 / 255, then 2 * x - 1 on a torch tensor.
    reference = 2.0 * torch.from_numpy(pixels.astype(np.float32) / 255.0) - 1.0
    np.testing.assert_array_equal(out, reference.numpy())
    np.testing.assert_array_equal(out, pixels.astype(np.float32) / np.float32(127.5) - np.float32(1))


def test_masked_image_matches_diffusers_formula():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    image = random_image(rng)
    mask = rng.random((64, 48)).astype(np.float32)
    out = editing.masked_image(image, mask)
    mask_condition = torch.from_numpy(mask.copy())
    mask_condition[mask_condition < 0.5] = 0
    mask_condition[mask_condition >= 0.5] = 1
    init = 2.0 * torch.from_numpy(image.astype(np.float32) / 255.0) - 1.0
    reference = init * (mask_condition < 0.5)[..., None]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, reference.numpy())
    assert not out[mask >= 0.5].any()
    with pytest.raises(ValueError, match="mask is 48x32 but the image is 48x64"):
        editing.masked_image(image, mask[:32])


# ---------------------------------------------------------------------------------------------------------------
# crop_region


def test_crop_region_properties():
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(300):
        image_h, image_w = rng.integers(16, 200, size=2)
        mask = np.zeros((image_h, image_w), np.float32)
        y0, x0 = rng.integers(0, image_h), rng.integers(0, image_w)
        y1, x1 = rng.integers(y0 + 1, image_h + 1), rng.integers(x0 + 1, image_w + 1)
        mask[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) * 0.9 + 0.1
        padding = int(rng.integers(0, 40))
        width, height = (int(v) for v in rng.choice([64, 96, 128, 192], size=2))
        region = editing.crop_region(mask, padding, width, height)
        assert all(type(v) is int for v in region)
        rx0, ry0, rx1, ry1 = region
        assert 0 <= rx0 < rx1 <= image_w and 0 <= ry0 < ry1 <= image_h
        assert rx0 <= max(0, x0 - padding) and rx1 >= min(image_w, x1 + padding)
        assert ry0 <= max(0, y0 - padding) and ry1 >= min(image_h, y1 + padding)
        region_w, region_h = rx1 - rx0, ry1 - ry0
        want_h, want_w = region_w * height / width, region_h * width / height
        has_aspect = abs(region_h - want_h) <= 1 or abs(region_w - want_w) <= 1
        too_small = (region_h == image_h and region_h < want_h - 1) or (region_w == image_w and region_w < want_w - 1)
        assert has_aspect or too_small
        checked += has_aspect
    assert checked > 100  # the aspect ratio is met in most cases, not only the too-small ones


def test_crop_region_examples():
    mask = np.zeros((100, 200), np.float32)
    mask[40:50, 90:110] = 1
    assert editing.crop_region(mask, 0, 64, 64) == (90, 35, 110, 55)  # 20 x 10 grown to 20 x 20
    assert editing.crop_region(mask, 5, 128, 64) == (80, 35, 120, 55)  # 30 x 20 grown to 40 x 20
    corner = np.zeros((100, 200), np.float32)
    corner[0:4, 190:200] = 0.2
    assert editing.crop_region(corner, 0, 64, 64) == (190, 0, 200, 10)  # shifted inside, not clipped
    assert editing.crop_region(corner, 0, 64, 128) == (190, 0, 200, 20)
    tall = np.zeros((100, 200), np.float32)
    tall[:, 10:20] = 1
    assert editing.crop_region(tall, 0, 64, 32) == (0, 0, 200, 100)  # wants 200 x 100: exactly the image
    assert editing.crop_region(tall, 0, 32, 64) == (0, 0, 50, 100)
    assert editing.crop_region(tall, 0, 512, 64) == (0, 0, 200, 100)  # wants 800 wide: the whole image
    with pytest.raises(ValueError, match="the mask is empty"):
        editing.crop_region(np.zeros((8, 8)), 4, 64, 64)
    with pytest.raises(ValueError, match="padding"):
        editing.crop_region(mask, -1, 64, 64)


# ---------------------------------------------------------------------------------------------------------------
# paste_back, paste_crop


def test_paste_back_is_exact_where_alpha_is_0_or_1():
    rng = np.random.default_rng(5)
    original, generated = random_image(rng, 64, 80), random_image(rng, 64, 80)
    alpha = rng.random((64, 80)).astype(np.float32)
    alpha[rng.random(alpha.shape) < 0.3] = 0
    alpha[rng.random(alpha.shape) < 0.2] = 1
    out = editing.paste_back(original, generated, alpha)
    assert out.dtype == np.uint8 and out.shape == original.shape
    np.testing.assert_array_equal(out[alpha == 0], original[alpha == 0])
    np.testing.assert_array_equal(out[alpha == 1], generated[alpha == 1])
    between = (alpha > 0) & (alpha < 1)
    blend = original + alpha[..., None] * (generated.astype(np.float64) - original)
    assert np.abs(out[between] - blend[between]).max() <= 0.5 + 1e-3
    from_pil = editing.paste_back(Image.fromarray(original), Image.fromarray(generated), alpha)
    np.testing.assert_array_equal(from_pil, out)


def test_paste_back_errors():
    rng = np.random.default_rng(0)
    image = random_image(rng)
    with pytest.raises(ValueError, match="the generated image is 48x32 but the original is 48x64"):
        editing.paste_back(image, image[:32], np.ones((64, 48)))
    with pytest.raises(ValueError, match="alpha is 48x32 but the image is 48x64"):
        editing.paste_back(image, image, np.ones((32, 48)))
    with pytest.raises(ValueError, match="uint8"):
        editing.paste_back(image.astype(np.float32), image, np.ones((64, 48)))


def test_paste_crop_changes_nothing_outside_the_region():
    rng = np.random.default_rng(6)
    original = random_image(rng, 64, 80)
    alpha = np.ones((64, 80), np.float32)  # nonzero everywhere, yet only the region may change
    region = (16, 8, 48, 40)
    crop = random_image(rng, 32, 32)
    out = editing.paste_crop(original, crop, region, alpha)
    outside = np.ones((64, 80), bool)
    outside[8:40, 16:48] = False
    np.testing.assert_array_equal(out[outside], original[outside])
    np.testing.assert_array_equal(out[8:40, 16:48], crop)  # same size: no resampling, alpha 1

    big = Image.fromarray(random_image(rng, 128, 128))  # the processing size: resized (Lanczos) to 32 x 32
    out = editing.paste_crop(original, big, region, alpha)
    np.testing.assert_array_equal(out[outside], original[outside])
    np.testing.assert_array_equal(out[8:40, 16:48], np.asarray(big.resize((32, 32), Image.Resampling.LANCZOS)))
    with pytest.raises(ValueError, match="region"):
        editing.paste_crop(original, crop, (0, 0, 100, 10), alpha)


# ---------------------------------------------------------------------------------------------------------------
# fill_masked


def test_fill_masked():
    rng = np.random.default_rng(7)
    image = random_image(rng)
    mask = np.zeros((64, 48), np.float32)
    mask[10:30, 5:40] = 1
    mask[40:50, 5:40] = 0.5
    for fill in ("original", "latent_noise", "latent_nothing"):
        np.testing.assert_array_equal(editing.fill_masked(image, mask, fill, rng), image)
    noisy = editing.fill_masked(image, mask, "noise", np.random.default_rng(1))
    np.testing.assert_array_equal(noisy[mask == 0], image[mask == 0])
    assert (noisy[mask == 1] != image[mask == 1]).mean() > 0.9
    np.testing.assert_array_equal(noisy, editing.fill_masked(image, mask, "noise", np.random.default_rng(1)))
    assert editing.FILLS == ("original", "fill", "noise", "latent_noise", "latent_nothing")
    with pytest.raises(ValueError, match="unknown fill 'blur'; choose one of original, fill, noise, latent_noise"):
        editing.fill_masked(image, mask, "blur", rng)


def test_fill_paints_the_hole_with_the_colours_around_it():
    # Left half red, right half blue, a hole across the middle: each side of the hole takes its own side's colour,
    # the known pixels keep their bytes, and the hole's middle is a blend.
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, :32] = (200, 0, 0)
    image[:, 32:] = (0, 0, 200)
    mask = np.zeros((48, 64), np.float32)
    mask[16:32, 8:56] = 1
    filled = editing.fill_masked(image, mask, "fill", np.random.default_rng(0))
    np.testing.assert_array_equal(filled[mask == 0], image[mask == 0])
    assert filled[24, 10, 0] > 180 and filled[24, 10, 2] < 20  # next to red
    assert filled[24, 53, 2] > 180 and filled[24, 53, 0] < 20  # next to blue
    assert 40 < filled[24, 32, 0] < 160 and 40 < filled[24, 32, 2] < 160
    # A fully masked image has no colour to spread: black, as AUTOMATIC1111's fill gives.
    assert not editing.fill_masked(image, np.ones((48, 64), np.float32), "fill", np.random.default_rng(0)).any()


# ---------------------------------------------------------------------------------------------------------------
# extend_canvas


def test_extend_canvas_sizes_and_mask():
    rng = np.random.default_rng(8)
    image = random_image(rng, 64, 48)
    canvas, mask, alpha = editing.extend_canvas(image, 16, 0, 8, 24, rng=rng)
    assert canvas.shape == (64 + 8 + 24, 48 + 16, 3) and canvas.dtype == np.uint8
    assert mask.shape == alpha.shape == canvas.shape[:2] and mask.dtype == alpha.dtype == np.float32
    np.testing.assert_array_equal(alpha, mask)
    np.testing.assert_array_equal(canvas[8:72, 16:64], image)
    new_area = np.ones(mask.shape, bool)
    new_area[8:72, 16:64] = False
    assert (mask[new_area] == 1).all()
    inner = mask[8:72, 16:64]
    ramp = 1 - (np.arange(8) + 0.5) / 8
    np.testing.assert_allclose(inner[32, :8], ramp)  # from the left border
    np.testing.assert_allclose(inner[:8, 24], ramp)  # from the top border
    np.testing.assert_allclose(inner[::-1][:8, 24], ramp)  # from the bottom border
    assert not inner[8:-8, 8:].any()  # the right side was not extended: no seam there
    np.testing.assert_allclose(inner[:8, :8], np.maximum(ramp[:, None], ramp[None, :]))  # corner: the max


def test_extend_canvas_preserves_the_interior_after_paste_back():
    rng = np.random.default_rng(9)
    image = random_image(rng, 32, 40)
    seam = 6
    canvas, mask, alpha = editing.extend_canvas(image, 8, 16, 24, 8, seam=seam, rng=rng)
    generated = random_image(rng, *canvas.shape[:2])
    out = editing.paste_back(canvas, generated, alpha)
    interior = (slice(24 + seam, 24 + 32 - seam), slice(8 + seam, 8 + 40 - seam))
    np.testing.assert_array_equal(out[interior], image[seam:-seam, seam:-seam])
    seam_ring = (mask > 0) & (mask < 1)
    assert seam_ring.sum() == (32 * 40) - (32 - 2 * seam) * (40 - 2 * seam)
    np.testing.assert_array_equal(out[mask == 1], generated[mask == 1])


def test_extend_canvas_fill_and_determinism():
    image = np.full((16, 16, 3), 100, np.uint8)
    image[:, -1] = 200
    canvas, mask, _ = editing.extend_canvas(image, 0, 64, 0, 0, seam=0, rng=np.random.default_rng(0))
    again, _, _ = editing.extend_canvas(image, 0, 64, 0, 0, seam=0, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(canvas, again)
    new = canvas[:, 16:].astype(np.float64)
    assert abs(new.mean() - 200) < 3  # the right edge stretched outward
    assert 30 < new.std() < 50  # plus noise
    np.testing.assert_array_equal(mask[:, :16], 0)  # seam 0: a hard edge
    np.testing.assert_array_equal(mask[:, 16:], 1)


def test_extend_canvas_errors():
    rng = np.random.default_rng(0)
    image = random_image(rng, 64, 48)
    with pytest.raises(ValueError, match="^left=10 is not a multiple of 8$"):
        editing.extend_canvas(image, 10, 0, 0, 0, rng=rng)
    with pytest.raises(ValueError, match="bottom=-8 must not be negative"):
        editing.extend_canvas(image, 0, 0, 0, -8, rng=rng)
    with pytest.raises(ValueError, match="top=40 is not a multiple of 64"):
        editing.extend_canvas(np.zeros((64, 64, 3), np.uint8), 0, 0, 40, 0, multiple=64, rng=rng)
    with pytest.raises(ValueError, match="^nothing to outpaint: give left, right, top or bottom$"):
        editing.extend_canvas(image, 0, 0, 0, 0, rng=rng)
    with pytest.raises(ValueError, match="image is 48x60 .* height 60 is not a multiple of 8"):
        editing.extend_canvas(image[:60], 8, 0, 0, 0, rng=rng)
    with pytest.raises(ValueError, match="seam"):
        editing.extend_canvas(image, 8, 0, 0, 0, seam=-1, rng=rng)
