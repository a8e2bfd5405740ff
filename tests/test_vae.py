"""Parity of sd_jax's AutoencoderKL with diffusers on random weights, in the SD layout at a small width."""

import dataclasses

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sd_jax.convert.params import abstract_model, state_from_torch
from sd_jax.modules.vae import AutoencoderKL, VAEConfig

SMALL = VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=8, sample_size=32)

# float32 on both sides with exact matmuls: only summation order differs (~1e-6 relative per layer, a few 1e-6
# after ~30 layers); 1e-4 of the output scale leaves headroom while any wrong layer shows up at 1e-2..1.
REL_TOL = 1e-4


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrites every parameter with O(1)-preserving random values (norm scales near 1, small biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def make_pair(config: VAEConfig, seed: int = 0):
    torch.manual_seed(seed)
    torch_model = randomize_(diffusers.AutoencoderKL(**config.to_dict()), seed)
    graphdef, abstract = abstract_model(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))
    state = state_from_torch(abstract, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
    return torch_model, nnx.merge(graphdef, state)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def assert_close(ours, ref: np.ndarray, rel: float = REL_TOL) -> None:
    scale = float(np.abs(ref).max())
    err = float(np.abs(np.asarray(ours) - ref).max())
    print(f"max abs err {err:.3g}, output scale {scale:.3g}, relative {err / scale:.3g}")
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=rel * scale)


@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        dataclasses.replace(
            SMALL, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False, layers_per_block=1
        ),
    ],
    ids=["sd", "no-attention-no-quant-conv"],
)
def test_encode_decode_parity(config):
    torch_model, model = make_pair(config)
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    latents = rng.standard_normal((2, 4, 4, config.latent_channels)).astype(np.float32)
    with torch.no_grad():
        dist = torch_model.encode(nchw(images)).latent_dist
        ref_mean, ref_logvar = nhwc(dist.mean), nhwc(dist.logvar)
        ref_images = nhwc(torch_model.decode(nchw(latents)).sample)

    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda state, x: nnx.merge(graphdef, state).encode(x))
    decode = jax.jit(lambda state, z: nnx.merge(graphdef, state).decode(z))
    mean, logvar = encode(state, jnp.asarray(images))
    assert mean.shape == logvar.shape == (2, 4, 4, config.latent_channels)
    assert_close(mean, ref_mean)
    assert_close(logvar, ref_logvar)
    decoded = decode(state, jnp.asarray(latents))
    assert decoded.shape == images.shape
    assert_close(decoded, ref_images)


def test_eager_matches_diffusers():
    config = VAEConfig(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
    )
    torch_model, model = make_pair(config, seed=2)
    images = np.random.default_rng(2).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(torch_model.decode(torch_model.encode(nchw(images)).latent_dist.mean).sample)
    mean, _ = model.encode(jnp.asarray(images))
    assert_close(model.decode(mean), ref)


def test_config_round_trips_through_diffusers():
    for config in (SMALL, VAEConfig()):
        with torch.device("meta"):
            saved = dict(diffusers.AutoencoderKL(**config.to_dict()).config)
        parsed = VAEConfig.from_dict(saved)
        assert parsed == config
        with torch.device("meta"):
            rebuilt = dict(diffusers.AutoencoderKL(**parsed.to_dict()).config)
        assert {k: v for k, v in rebuilt.items() if not k.startswith("_")} == {
            k: v for k, v in saved.items() if not k.startswith("_")
        }


@pytest.mark.parametrize(
    "key,value",
    [("act_fn", "gelu"), ("latents_mean", [0.0] * 4), ("down_block_types", ["Foo"] * 4), ("some_future_key", 1)],
)
def test_unsupported_config_raises(key, value):
    with torch.device("meta"):
        saved = dict(diffusers.AutoencoderKL(**SMALL.to_dict()).config)
    with pytest.raises(ValueError, match=key if key != "down_block_types" else "DownEncoderBlock2D"):
        VAEConfig.from_dict(saved | {key: value})
