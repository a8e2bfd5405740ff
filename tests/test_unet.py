"""Parity of sd_jax's UNet2DConditionModel with diffusers on random weights (SD 1.x, SD 2.x, inpainting, full size)."""

import dataclasses
import resource
import time

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sd_jax.convert.params import abstract_model, state_from_torch, torch_name, torch_to_flax_layout
from sd_jax.modules.unet import UNet2DConditionModel, UNetConfig

SMALL = dict(
    sample_size=16,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=48,
    norm_num_groups=8,
)
SD1_SMALL = UNetConfig(**SMALL, attention_head_dim=4)
SD2_SMALL = UNetConfig(
    **SMALL | dict(layers_per_block=2),
    attention_head_dim=(2, 2, 4, 4),  # diffusers reads these as head counts: 16-wide heads, as SD 2's 64-wide
    use_linear_projection=True,
    upcast_attention=True,
    transformer_layers_per_block=2,
)
INPAINT_SMALL = dataclasses.replace(SD1_SMALL, in_channels=9)
TWO_LEVEL = UNetConfig(
    **SMALL | dict(block_out_channels=(32, 64)),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
)

# float32 on both sides with exact matmuls: the only differences are summation order (conv/matmul/softmax
# reassociation), ~1e-6 relative per layer, growing to a few 1e-6..1e-5 through ~50 layers. 1e-4 of the output
# scale leaves an order of magnitude of headroom, while a wrong layer (a missing bias, a transposed kernel,
# 0.1-scale random weights) shows up at 1e-2..1.
REL_TOL = 1e-4


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrites every parameter (including the zero-initialised ones) with O(1)-preserving random values."""
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


def to_nnx(torch_model: torch.nn.Module, config: UNetConfig) -> UNet2DConditionModel:
    graphdef, abstract = abstract_model(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)))
    state = state_from_torch(abstract, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
    return nnx.merge(graphdef, state)


def inputs(config: UNetConfig, batch: int = 2, size: tuple[int, int] = (16, 16), seed: int = 1):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, *size, config.in_channels), dtype=np.float32)
    timesteps = np.array([999.0, 17.5][:batch] + [500.0] * max(batch - 2, 0), dtype=np.float32)
    context = rng.standard_normal((batch, 7, config.cross_attention_dim), dtype=np.float32)
    return sample, timesteps, context


def torch_forward(model, sample, timesteps, context) -> np.ndarray:
    with torch.no_grad():
        out = model(
            torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(timesteps), torch.from_numpy(context)
        ).sample
    return out.permute(0, 2, 3, 1).numpy()


def assert_close(ours: np.ndarray, ref: np.ndarray, rel: float = REL_TOL) -> None:
    scale = float(np.abs(ref).max())
    err = float(np.abs(np.asarray(ours) - ref).max())
    print(f"max abs err {err:.3g}, output scale {scale:.3g}, relative {err / scale:.3g}")
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=rel * scale)


def run(model: UNet2DConditionModel, sample, timesteps, context) -> jax.Array:
    """The model under jax.jit over its split state (eager NNX dispatch compiles op by op: ~5x slower here)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x, t, c: nnx.merge(graphdef, state)(x, t, c))
    return forward(state, jnp.asarray(sample), jnp.asarray(timesteps), jnp.asarray(context))


def make_pair(config: UNetConfig, seed: int = 0):
    torch.manual_seed(seed)
    torch_model = randomize_(diffusers.UNet2DConditionModel(**config.to_dict()), seed)
    return torch_model, to_nnx(torch_model, config)


@pytest.mark.parametrize(
    "config,size",
    [(SD1_SMALL, (16, 16)), (SD1_SMALL, (12, 20)), (SD2_SMALL, (16, 16)), (INPAINT_SMALL, (16, 16))],
    ids=["sd1", "sd1-odd-size", "sd2", "inpaint"],
)
def test_parity_with_diffusers(config, size):
    torch_model, model = make_pair(config)
    sample, timesteps, context = inputs(config, size=size)
    ref = torch_forward(torch_model, sample, timesteps, context)
    out = run(model, sample, timesteps, context)
    assert out.shape == ref.shape
    assert_close(out, ref)


def test_eager_matches_diffusers():
    """Without jit, on a two-level U-Net (eager cost grows with the number of distinct ops, not their size)."""
    config = TWO_LEVEL
    torch_model, model = make_pair(config, seed=3)
    sample, timesteps, context = inputs(config, size=(8, 8))
    ref = torch_forward(torch_model, sample, timesteps, context)
    assert_close(model(jnp.asarray(sample), jnp.asarray(timesteps), jnp.asarray(context)), ref)
    # A scalar timestep broadcasts over the batch.
    one_t = model(jnp.asarray(sample), jnp.float32(999.0), jnp.asarray(context))
    assert_close(one_t[:1], ref[:1])


def test_bfloat16_runs_close_to_float32():
    torch_model, model32 = make_pair(TWO_LEVEL)
    graphdef, abstract = abstract_model(lambda: UNet2DConditionModel(TWO_LEVEL, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    model16 = nnx.merge(graphdef, state_from_torch(abstract, sd, dtype=jnp.bfloat16))
    sample, timesteps, context = inputs(TWO_LEVEL)
    out32 = run(model32, sample, timesteps, context)
    out16 = run(model16, sample, timesteps, context)
    assert out16.dtype == jnp.float32  # returned in the dtype of `sample`
    # bf16 keeps 8 mantissa bits: ~1e-2 relative per layer, so only a coarse agreement is expected.
    assert float(jnp.abs(out16 - out32).max()) < 0.1 * float(jnp.abs(out32).max())


def test_config_round_trips_through_diffusers():
    for config in (SD1_SMALL, SD2_SMALL, INPAINT_SMALL, UNetConfig()):
        # What a diffusers config.json holds: the model's saved config, with every default filled in.
        torch_config = dict(diffusers_model_config(config.to_dict()))
        parsed = UNetConfig.from_dict(torch_config)
        assert parsed == config
        rebuilt = dict(diffusers_model_config(parsed.to_dict()))
        assert {k: v for k, v in rebuilt.items() if not k.startswith("_")} == {
            k: v for k, v in torch_config.items() if not k.startswith("_")
        }


def diffusers_model_config(kwargs: dict) -> dict:
    with torch.device("meta"):  # no weights allocated, so the full-size config is instant
        return dict(diffusers.UNet2DConditionModel(**kwargs).config)


@pytest.mark.parametrize(
    "key,value",
    [
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text_time"),
        ("dual_cross_attention", True),
        ("only_cross_attention", True),
        ("time_cond_proj_dim", 256),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 4),
        ("act_fn", "gelu"),
        ("some_future_key", 1),
    ],
)
def test_unsupported_config_raises(key, value):
    config = diffusers_model_config(SD1_SMALL.to_dict())
    with pytest.raises(ValueError, match=key if key != "down_block_types" else "SimpleCrossAttnDownBlock2D"):
        UNetConfig.from_dict(config | {key: value})


def test_full_size_sd21_matches_diffusers_keys_and_shapes():
    """SD 2.1 (768-v) layout: every diffusers key and shape, checked without allocating any weights."""
    sd21 = dict(
        sample_size=96,
        attention_head_dim=[5, 10, 20, 20],
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
    )
    config = UNetConfig.from_dict(diffusers_model_config(UNetConfig().to_dict() | sd21))
    with torch.device("meta"):
        torch_model = diffusers.UNet2DConditionModel(**config.to_dict())
    # The layout transform applied to zero-stride views: shapes without allocating anything.
    expected = {
        k: torch_to_flax_layout("kernel" if v.ndim in (2, 4) else "bias", np.broadcast_to(np.float32(0), v.shape)).shape
        for k, v in torch_model.state_dict().items()
    }
    _, abstract = abstract_model(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)))
    ours = {torch_name(path): tuple(v.get_value().shape) for path, v in nnx.to_flat_state(abstract)}
    assert ours == expected
    assert sum(np.prod(s) for s in ours.values()) == sum(p.numel() for p in torch_model.parameters())


def test_full_size_sd15_parity():
    """The real SD 1.5 U-Net (860M parameters, default random init) at 32x32 latents, batch 1."""
    start = time.perf_counter()
    config = UNetConfig()
    torch.manual_seed(0)
    torch_model = diffusers.UNet2DConditionModel(**config.to_dict()).eval()
    model = to_nnx(torch_model, config)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params == sum(p.numel() for p in torch_model.parameters())
    sample, timesteps, context = inputs(config, batch=1, size=(32, 32))
    setup = time.perf_counter()
    ref = torch_forward(torch_model, sample, timesteps, context)
    torch_done = time.perf_counter()
    out = jax.block_until_ready(run(model, sample, timesteps, context))
    done = time.perf_counter()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"\n{n_params / 1e6:.0f}M params; setup {setup - start:.1f}s, torch {torch_done - setup:.1f}s, "
        f"jax jit+run {done - torch_done:.1f}s, total {done - start:.1f}s, peak RSS {peak_gb:.1f} GB"
    )
    assert_close(out, ref)


@pytest.mark.parametrize("config", [SD1_SMALL, SD2_SMALL], ids=["sd1", "sd2"])
def test_parity_with_blocked_cpu_attention(monkeypatch, config):
    """The CPU path that computes attention one head and query block at a time, forced on at a small size."""
    from sd_jax.modules import attention

    monkeypatch.setattr(attention, "_CPU_BLOCK_LOGITS", 64)
    torch_model, model = make_pair(config)
    sample, timesteps, context = inputs(config)
    ref = torch_forward(torch_model, sample, timesteps, context)
    assert_close(run(model, sample, timesteps, context), ref)


@pytest.mark.parametrize(
    "b, lq, lk, heads, upcast", [(2, 64, 64, 4, False), (1, 256, 77, 8, True), (3, 32, 48, 1, False)]
)
def test_blocked_attention_matches_the_fused_product(monkeypatch, b, lq, lk, heads, upcast):
    from sd_jax.modules import attention

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, lq, heads * 16), dtype=np.float32))
    k = jnp.asarray(rng.standard_normal((b, lk, heads * 16), dtype=np.float32))
    v = jnp.asarray(rng.standard_normal((b, lk, heads * 16), dtype=np.float32))
    fused = attention.scaled_dot_product_attention(q, k, v, heads=heads, upcast=upcast)
    monkeypatch.setattr(attention, "_CPU_BLOCK_LOGITS", 16 * lk)  # several query blocks per head
    blocked = attention.scaled_dot_product_attention(q, k, v, heads=heads, upcast=upcast)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(fused), rtol=1e-5, atol=1e-6)
