"""Standardizing a VAE's latent channels in place: the encoder emits (mean - shift) / scale, the decoder undoes it."""

import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.config import preset
from sd_jax.convert.params import state_to_flat
from sd_jax.models import abstract_components, random_components
from sd_jax.training import latent_space
from sd_jax.training.loss import merge


@pytest.fixture(scope="module")
def vae():
    config = preset("tiny")
    graph, abstract = abstract_components(config, jnp.float32)["vae"]
    flat = state_to_flat(random_components(config, jnp.float32, seed=3)["vae"])
    # Random weights give latents near zero; an offset per channel, as a trained VAE has, makes the test bite.
    flat["quant_conv.bias"] = flat["quant_conv.bias"] + np.array([1.5, -2.0, 0.5, 3.0, 0, 0, 0, 0], np.float32)

    def module(params):
        return merge(graph, abstract, {k: jnp.asarray(v) for k, v in params.items()})

    return flat, module


def test_standardized_vae_encodes_standardized_latents_and_decodes_the_same(vae):
    flat, module = vae
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
    mean, logvar = (np.asarray(a, np.float64) for a in module(flat).encode(x))
    shift, scale = latent_space.channel_stats(mean)
    assert np.abs(shift).max() > 0.4  # the channels really are offset

    folded = latent_space.standardize_vae(flat, shift, scale)
    assert all(folded[k].dtype == flat[k].dtype and folded[k].shape == flat[k].shape for k in flat)
    mean2, logvar2 = (np.asarray(a, np.float64) for a in module(folded).encode(x))
    # float32 rounding of the 1x1 convolutions; the latents are O(1).
    np.testing.assert_allclose(mean2, (mean - shift) / scale, atol=2e-5)
    np.testing.assert_allclose(logvar2, logvar - 2 * np.log(scale), atol=2e-5)
    new_shift, new_scale = latent_space.channel_stats(mean2)
    np.testing.assert_allclose(new_shift, 0.0, atol=1e-5)
    np.testing.assert_allclose(new_scale, 1.0, atol=1e-5)

    z = np.random.default_rng(1).standard_normal(mean.shape)
    before = np.asarray(module(flat).decode(jnp.asarray(z * scale + shift, jnp.float32)))
    after = np.asarray(module(folded).decode(jnp.asarray(z, jnp.float32)))
    np.testing.assert_allclose(after, before, atol=1e-5)


def test_standardize_vae_rejects_bad_scales(vae):
    flat, _ = vae
    with pytest.raises(ValueError, match="positive"):
        latent_space.standardize_vae(flat, np.zeros(4), np.array([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="quant_conv"):
        latent_space.standardize_vae({k: v for k, v in flat.items() if "quant" not in k}, np.zeros(4), np.ones(4))
