"""A float16 VAE decode that overflows is redone in float32 (`LatentCodec.decode`), on a tiny random VAE."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sd_jax.config import preset
from sd_jax.latents import LatentCodec
from sd_jax.models import abstract_components, random_components

MESSAGE = "VAE decode overflowed in float16; decoded in float32"


def codec(dtype, state) -> LatentCodec:
    config = preset("tiny")
    graphdef, _ = abstract_components(config, dtype)["vae"]
    vae = LatentCodec(graphdef, config.vae, dtype, factor=2 ** (len(config.vae.block_out_channels) - 1))
    vae.state = state
    return vae


@pytest.fixture(scope="module")
def state16():
    return random_components(preset("tiny"), jnp.float16)["vae"]


@pytest.fixture(scope="module")
def overflowing16(state16):
    """The same weights with the decoder's first conv 1e5x larger: its outputs (~1e5) pass float16's 65504, while
    in float32 the next GroupNorm brings them back to order one."""
    flat = []
    for path, variable in nnx.to_flat_state(state16):
        if path == ("decoder", "conv_in", "kernel"):  # scaled in float32: 1e5 itself is inf in float16
            variable = variable.replace((variable.get_value().astype(jnp.float32) * 1e5).astype(jnp.float16))
        flat.append((path, variable))
    return nnx.from_flat_state(flat)


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(0).standard_normal((2, 8, 8, 4), dtype=np.float32)


def test_overflow_decodes_in_float32_and_says_so(overflowing16, latents, caplog):
    vae = codec(jnp.float16, overflowing16)
    raw16 = np.asarray(vae.decode_raw(overflowing16, jnp.asarray(latents, jnp.float16)), np.float32)
    assert not np.isfinite(raw16).all()  # the premise: float16 overflows
    with caplog.at_level(logging.WARNING, logger="sd_jax"):
        images = vae.decode(latents)
    assert [r.getMessage() for r in caplog.records] == [MESSAGE]
    assert np.isfinite(images).all() and images.shape == (2, 64, 64, 3)
    # The reference: a float32 codec with the float16 weights cast up, the same computation compiled apart. On CPU
    # the numbers come out equal; a GPU may autotune another convolution algorithm for each compilation (float32
    # rounding, ~1e-6 per layer on pixels in [0, 1]). 1e-4 allows that, while a float16 or a wrong-weights decode
    # is NaN or off by ~0.1.
    reference = codec(jnp.float32, jax.tree.map(lambda x: x.astype(jnp.float32), overflowing16)).decode(latents)
    np.testing.assert_allclose(images, reference, rtol=0, atol=1e-4)
    assert np.ptp(images) > 0.1  # not a constant (all-clipped) image
    # One float32 copy, kept for the next overflow and dropped with the weights it was made from.
    copy = vae._float32
    vae.decode(latents)
    assert vae._float32 is copy
    vae.state = overflowing16
    assert vae._float32 is None


def test_finite_float16_decode_is_kept(state16, latents, caplog):
    """The normal case: no second decode, no float32 copy, no message."""
    vae = codec(jnp.float16, state16)
    with caplog.at_level(logging.WARNING, logger="sd_jax"):
        images = vae.decode(latents)
    assert caplog.records == [] and vae._float32 is None
    raw16 = np.asarray(vae.decode_raw(state16, jnp.asarray(latents, jnp.float16)), np.float32)
    np.testing.assert_array_equal(images, np.clip(raw16 / 2.0 + 0.5, 0.0, 1.0))


def test_pipeline_samples_again_without_the_overflowing_decode(overflowing16, monkeypatch):
    """The compiled program decodes images up to a megapixel itself: a float16 overflow there makes the pipeline
    take the latents instead (a second run of the program with decode off) and decode them through the codec."""
    import sd_jax
    from sd_jax.settings import GenerationSettings

    pipe = sd_jax.load("random:tiny", "float16")
    pipe.states = {**pipe.states, "vae": overflowing16}
    prepared = pipe.prepare(GenerationSettings(prompt="a cat", height=32, width=32, steps=2))
    latents = np.random.default_rng(1).standard_normal((1, 4, 4, 4)).astype(np.float32)
    decoded_in_program = []

    def run(states, batch, static, progress, *, pad_to=0):
        decoded_in_program.append(static.decode)
        return np.full((1, 32, 32, 3), np.nan, np.float32) if static.decode else latents

    monkeypatch.setattr(pipe.program, "run", run)
    pixels = pipe.sample(prepared.batch, prepared.static)
    assert decoded_in_program == [True, False]
    np.testing.assert_array_equal(pixels, (pipe.decode_latents(latents) * 255.0).round().astype(np.uint8))
