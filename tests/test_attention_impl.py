"""The attention kernels: the table that picks one per layer, XLA's `dot_product_attention` against the einsum
product on CPU, and (on a GPU only) cuDNN's flash attention against XLA's at Stable Diffusion's sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.modules import attention
from sd_jax.modules.attention import attention_implementation

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (cuDNN)")


def qkv(b, lq, lk, heads, d, dtype=jnp.float32, seed=0):
    """Random q (B, Lq, H*d), k and v (B, Lk, H*d) of unit scale."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, n, heads * d), dtype=np.float32), dtype) for n in (lq, lk, lk))


def key_mask(b, lk, seed=1):
    """(B, Lk) bool with scattered holes (not a prefix) and at least one key kept per row."""
    mask = np.random.default_rng(seed).random((b, lk)) < 0.6
    mask[:, 0] = True
    return jnp.asarray(mask)


def forced(monkeypatch, implementation):
    """scaled_dot_product_attention under jit with every layer on one kernel (as SD_JAX_ATTENTION would set it).

    Each call jits a new function: jit's cache, keyed by the function, knows nothing of the kernel choice.
    """
    monkeypatch.setattr(attention, "ATTENTION", implementation)

    def attend(q, k, v, mask=None, **static):
        return jax.jit(lambda *a: attention.scaled_dot_product_attention(*a[:3], mask=a[3], **static))(q, k, v, mask)

    return attend


@pytest.fixture
def library_calls(monkeypatch):
    """The implementations `jax.nn.dot_product_attention` is called with (to see which kernel a test ran)."""
    calls = []
    original = jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kwargs):
        calls.append(implementation)
        return original(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    return calls


# -- the table ---------------------------------------------------------------------------------------------------------
BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


@pytest.mark.parametrize(
    "head_dim, dtype, backend, expected",
    [
        (40, BF16, "gpu", "cudnn"),  # SD 1.x, 64x64 latents
        (80, BF16, "gpu", "cudnn"),  # SD 1.x, 32x32
        (64, F16, "gpu", "cudnn"),  # SD 2.x everywhere
        (128, BF16, "gpu", "cudnn"),
        (160, BF16, "gpu", "xla"),  # SD 1.x, 16x16 and 8x8: cuDNN only on Hopper and newer
        (512, BF16, "gpu", "xla"),  # the VAE's single head
        (36, BF16, "gpu", "xla"),  # not a multiple of 8
        (64, F32, "gpu", "xla"),  # flash attention is bf16/fp16 only
        (64, BF16, "cpu", "einsum"),
        (64, BF16, "tpu", "einsum"),
    ],
)
def test_auto_table(head_dim, dtype, backend, expected):
    assert attention_implementation(head_dim, dtype, backend, requested="auto") == expected


def test_auto_blocks_large_cpu_attention_only():
    big = attention._CPU_BLOCK_LOGITS
    assert attention_implementation(64, F32, "cpu", logits=big, requested="auto") == "blocked"
    assert attention_implementation(64, F32, "cpu", logits=big - 1, requested="auto") == "einsum"
    assert attention_implementation(64, F32, "tpu", logits=big, requested="auto") == "einsum"
    assert attention_implementation(64, BF16, "gpu", logits=big, requested="auto") == "cudnn"


@pytest.mark.parametrize(
    "head_dim, dtype, backend, expected",
    [
        (160, BF16, "gpu", "cudnn"),  # forced: trusts the GPU to be Hopper or newer
        (256, F16, "gpu", "cudnn"),
        (264, BF16, "gpu", "xla"),
        (40, F32, "gpu", "xla"),
        (64, BF16, "cpu", "xla"),  # no cuDNN without a GPU
    ],
)
def test_forced_cudnn_falls_back_to_xla_where_it_has_no_kernel(head_dim, dtype, backend, expected):
    assert attention_implementation(head_dim, dtype, backend, requested="cudnn") == expected


@pytest.mark.parametrize("requested", ["einsum", "blocked", "xla"])
@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_forced_portable_kernels_apply_everywhere(requested, backend):
    assert attention_implementation(160, F32, backend, requested=requested) == requested


def test_the_environment_variable_is_the_default_and_checked(monkeypatch):
    monkeypatch.setattr(attention, "ATTENTION", "xla")
    assert attention_implementation(64, F32, "cpu") == "xla"
    monkeypatch.setattr(attention, "ATTENTION", "flash")
    with pytest.raises(ValueError, match="SD_JAX_ATTENTION must be one of"):
        attention_implementation(64, F32, "cpu")


# -- XLA's dot_product_attention against the einsum product (CPU) ------------------------------------------------------
# float32 on both sides: the same products and softmax, differing in rounding only (1/np.sqrt(d) against d**-0.5 can
# be one ulp apart, and the contractions may sum in another order): ~1e-7 relative on outputs that are convex
# combinations of unit-scale values (|out| < ~4). 1e-6 is several ulps of headroom; a wrong scale, a dropped mask or
# swapped heads is off by 1e-2..1.
F32_TOL = 1e-6


@pytest.mark.parametrize(
    "b, lq, lk, heads, d, masked",
    [
        (2, 24, 24, 1, 16, False),  # self-attention, one head (the VAE's)
        (2, 24, 24, 4, 8, False),  # self-attention, several heads
        (2, 24, 11, 4, 8, False),  # cross-attention on a short context
        (2, 24, 11, 4, 8, True),  # cross-attention with padding tokens masked out
        (3, 16, 16, 2, 8, True),  # a masked self-attention
    ],
)
def test_xla_kernel_matches_einsum_in_float32(monkeypatch, library_calls, b, lq, lk, heads, d, masked):
    q, k, v = qkv(b, lq, lk, heads, d)
    mask = key_mask(b, lk) if masked else None
    einsum = forced(monkeypatch, "einsum")(q, k, v, heads=heads, mask=mask)
    assert library_calls == []
    xla = forced(monkeypatch, "xla")(q, k, v, heads=heads, mask=mask)
    assert library_calls == ["xla"]
    assert xla.shape == einsum.shape == q.shape and xla.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(xla), np.asarray(einsum), rtol=0, atol=F32_TOL)


@pytest.mark.parametrize("implementation", ["einsum", "blocked", "xla"])
def test_masked_keys_get_exactly_zero_weight(monkeypatch, implementation):
    """A masked key's value, however large, changes nothing: its softmax weight is exactly 0."""
    q, k, v = qkv(2, 8, 6, 2, 8)
    mask = jnp.asarray([[True, True, False, True, False, False], [True, False, True, True, True, False]])
    attend = forced(monkeypatch, implementation)
    out = attend(q, k, v, heads=2, mask=mask)
    poisoned = jnp.where(mask[:, :, None], v, 1e30)
    np.testing.assert_array_equal(np.asarray(attend(q, k, poisoned, heads=2, mask=mask)), np.asarray(out))


def test_xla_kernel_implies_upcast_in_bfloat16(monkeypatch, library_calls):
    """The einsum product with q, k upcast to float32 against the XLA kernel on the bfloat16 inputs: the logits are
    the same float32 numbers (bf16 products are exact in float32), so the outputs differ by the rounding of
    bfloat16 weights and outputs alone: a few bf16 ulps (2^-8 relative) of values below ~4, within 3e-2."""
    q, k, v = qkv(2, 32, 9, 2, 16, BF16)
    upcast = forced(monkeypatch, "einsum")(q, k, v, heads=2, upcast=True)
    xla = forced(monkeypatch, "xla")(q, k, v, heads=2, upcast=True)
    assert library_calls == ["xla"]
    assert xla.dtype == upcast.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(xla, np.float32), np.asarray(upcast, np.float32), rtol=0, atol=3e-2)


# -- cuDNN's flash attention against XLA's (GPU only) ------------------------------------------------------------------
# Both bfloat16 kernels take float32 logits and softmax and round the probabilities and the output to bfloat16
# (2^-9 relative): against the float32 product of the same inputs, XLA's output is off by ~0.1% of its scale on
# average and ~0.3% at most (measured on CPU at these shapes). Flash attention rounds unnormalised probabilities block
# by block instead, an error of the same size, so cuDNN must come within 2x (mean) and 3x (max) of XLA's error. A 5%
# error in the scale is 15-50x XLA's mean error, a dropped mask or mixed-up heads far more.


@on_gpu
@pytest.mark.parametrize("head_dim, heads", [(40, 8), (64, 5), (80, 8), (160, 8)])
@pytest.mark.parametrize("lq, lk, masked", [(4096, 4096, False), (1024, 77, False), (1024, 154, True)])
def test_cudnn_matches_xla_in_bfloat16(monkeypatch, library_calls, head_dim, heads, lq, lk, masked):
    """SD-like sizes (a guidance batch of 2): self-attention over 64x64 latents, cross-attention on 77 tokens, and on
    154 with one prompt's second chunk masked out. A 160-wide head needs a Hopper or newer GPU."""
    q, k, v = qkv(2, lq, lk, heads, head_dim, BF16)
    mask = jnp.asarray(np.arange(lk)[None, :] < np.array([[lk], [77]])) if masked else None
    assert attention_implementation(head_dim, BF16, "gpu", requested="cudnn") == "cudnn"
    cudnn = forced(monkeypatch, "cudnn")(q, k, v, heads=heads, mask=mask)
    xla = forced(monkeypatch, "xla")(q, k, v, heads=heads, mask=mask)
    exact = forced(monkeypatch, "xla")(*(x.astype(F32) for x in (q, k, v)), heads=heads, mask=mask)
    assert library_calls == ["cudnn", "xla", "xla"]
    assert cudnn.dtype == jnp.bfloat16
    exact = np.asarray(exact)
    err_cudnn = np.abs(np.asarray(cudnn, np.float32) - exact)
    err_xla = np.abs(np.asarray(xla, np.float32) - exact)
    print(
        f"d={head_dim} Lq={lq} Lk={lk}: output max {np.abs(exact).max():.3g}; error of cudnn max "
        f"{err_cudnn.max():.3g} mean {err_cudnn.mean():.3g}, of xla max {err_xla.max():.3g} mean {err_xla.mean():.3g}"
    )
    assert err_cudnn.mean() <= 2 * err_xla.mean()
    assert err_cudnn.max() <= 3 * err_xla.max()


@on_gpu
def test_auto_on_gpu_compiles_to_cudnn(monkeypatch):
    """The default choice really reaches cuDNN: its custom call is in the compiled program of a 40-wide layer."""
    monkeypatch.setattr(attention, "ATTENTION", "auto")
    q, k, v = qkv(2, 256, 77, 8, 40, BF16)
    attend = jax.jit(lambda q, k, v: attention.scaled_dot_product_attention(q, k, v, heads=8))
    assert "cudnn" in attend.lower(q, k, v).compile().as_text().lower()
