"""Attention and transformer blocks of the Stable Diffusion U-Net and the VAE mid-block.

Tokens are (B, L, D); feature maps are NHWC. Attribute names follow diffusers so checkpoints map 1:1.

Each attention layer picks its kernel when it is traced, from static shapes and dtypes (`attention_implementation`):

    einsum   one fused einsum softmax product (CPU below the blocking size, TPU)
    blocked  the same product one head and query block at a time (CPU, large sequences)
    xla      `jax.nn.dot_product_attention(implementation="xla")` (GPU layers cuDNN does not take)
    cudnn    cuDNN's flash attention, `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16)

The environment variable SD_JAX_ATTENTION, read once at import, overrides the choice: "auto" (the default, above),
or one of the four names for every layer it can run (see `attention_implementation`), e.g.

    SD_JAX_ATTENTION=xla python scripts/txt2img.py ...
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from sd_jax.modules.layers import GroupNorm, LayerNorm, conv2d, linear

# On CPU, attention over this many logits per head or more is computed in blocks (see below).
_CPU_BLOCK_LOGITS = 1 << 21

IMPLEMENTATIONS = ("auto", "einsum", "blocked", "xla", "cudnn")
# Read once: a layer's kernel is fixed when it is traced, so a later change would not reach compiled programs anyway.
ATTENTION = os.environ.get("SD_JAX_ATTENTION", "auto").strip().lower()


def attention_implementation(
    head_dim: int, dtype, backend: str, *, logits: int = 0, requested: str | None = None
) -> str:
    """The attention kernel of one layer: "einsum", "blocked", "xla" or "cudnn".

    "auto" keeps the einsum product on CPU (blocked from `_CPU_BLOCK_LOGITS` logits per head on) and on TPU. On GPU
    it takes cuDNN's flash attention for bfloat16/float16 heads of width a multiple of 8 up to 128, which every GPU
    and cuDNN that JAX supports runs (SD 1.x's 40 and 80, SD 2.x's 64), and XLA's product otherwise (SD 1.x's
    160-wide heads, float32, the VAE's single 512-wide head). A forced "cudnn" also takes heads up to 256 wide, which
    needs a Hopper or newer GPU, and runs "xla" where no cuDNN kernel exists (other widths and dtypes, no GPU);
    "einsum", "blocked" and "xla" run everywhere.

    Args:
      head_dim: d, the width of one head.
      dtype: the dtype of q, k and v.
      backend: `jax.default_backend()`: "cpu", "gpu" or "tpu".
      logits: B * Lq * Lk, the logits of one head.
      requested: one of `IMPLEMENTATIONS`; default `ATTENTION` (SD_JAX_ATTENTION).
    """
    requested = ATTENTION if requested is None else requested
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"SD_JAX_ATTENTION must be one of {', '.join(IMPLEMENTATIONS)}, got {requested!r}")
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if requested == "auto":
        if backend == "gpu":
            return "cudnn" if half and head_dim % 8 == 0 and head_dim <= 128 else "xla"
        return "blocked" if backend == "cpu" and logits >= _CPU_BLOCK_LOGITS else "einsum"
    if requested == "cudnn" and not (backend == "gpu" and half and head_dim % 8 == 0 and head_dim <= 256):
        return "xla"
    return requested


def scaled_dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, heads: int, upcast: bool = False, mask: jax.Array | None = None
) -> jax.Array:
    """Multi-head softmax(q k^T / sqrt(d)) v with float32 logits and softmax, by the layer's kernel (see the top).

    Args:
      q: (B, Lq, H*d); k, v: (B, Lk, H*d), all of one dtype for the "xla" and "cudnn" kernels.
      heads: H.
      upcast: also cast q and k to float32 before the product (SD 2.x `upcast_attention`, avoids fp16 overflow);
        implied by the "xla" and "cudnn" kernels.
      mask: optional (B, Lk) bool; keys where it is False get exactly zero weight.

    Returns:
      (B, Lq, H*d) in v's dtype.
    """
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    implementation = attention_implementation(d, q.dtype, jax.default_backend(), logits=b * lq * lk)
    if implementation in ("xla", "cudnn"):
        # Both accumulate q k^T in float32, where the product of two bfloat16 or float16 numbers is exact: `upcast`
        # would change nothing, and they need q, k and v in one dtype.
        return _library_attention(q, k, v, heads=heads, mask=mask, implementation=implementation)
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    if implementation == "blocked":
        return _blocked_attention(q, k, v, heads=heads, mask=mask)
    q = q.reshape(b, lq, heads, d)
    k = k.reshape(b, lk, heads, d)
    v = v.reshape(b, lk, heads, d)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = _mask_logits(logits, mask[:, None, None, :])
    weights = jax.nn.softmax(logits * (d**-0.5), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return out.reshape(b, lq, inner)


def _library_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, heads: int, mask: jax.Array | None, implementation: str
) -> jax.Array:
    """The same attention through `jax.nn.dot_product_attention`, which also takes float32 logits and softmax.

    The key mask goes in as a (B, 1, Lq, Lk) boolean mask rather than as key lengths, since the keys it keeps need
    not be a prefix; cuDNN wants it over the whole (Lq, Lk) grid (as a bias), XLA would broadcast it either way.
    """
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    if mask is not None:
        mask = jnp.broadcast_to(mask[:, None, None, :], (b, 1, lq, lk))
    # JAX's own code mixes bfloat16 with float32 by implicit promotion, which strict promotion (the tests') refuses.
    with jax.numpy_dtype_promotion("standard"):
        out = jax.nn.dot_product_attention(
            q.reshape(b, lq, heads, d),
            k.reshape(b, lk, heads, d),
            v.reshape(b, lk, heads, d),
            mask=mask,
            implementation=implementation,
        )
    return out.reshape(b, lq, inner)


def _mask_logits(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Sets masked logits to the lowest float32: after the max subtraction their exp is exactly 0."""
    return jnp.where(mask, logits, jnp.finfo(jnp.float32).min)


def _blocked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, heads: int, mask: jax.Array | None = None
) -> jax.Array:
    """The same attention, one head and one block of queries at a time.

    On CPU the full (B, H, Lq, Lk) logits of a 64x64 latent (4096 tokens) are half a gigabyte: streaming them
    through memory dominates. A `lax.map` over (head, query block) keeps each block's logits near the cache and
    runs about 2.5x faster at Lq = Lk = 1024 or 4096. Accelerators keep the single fused product.
    """
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    block = lq
    while b * block * lk > _CPU_BLOCK_LOGITS and block % 2 == 0:
        block //= 2
    n = lq // block
    # (H * n, B, block, d): one entry per (head, query block).
    qb = q.reshape(b, n, block, heads, d).transpose(3, 1, 0, 2, 4).reshape(heads * n, b, block, d)
    kh = k.reshape(b, lk, heads, d).transpose(2, 0, 3, 1)  # (H, B, d, Lk)
    vh = v.reshape(b, lk, heads, d).transpose(2, 0, 1, 3)  # (H, B, Lk, d)

    def one(args):
        i, q_block = args
        head = i // n
        logits = jnp.matmul(q_block, kh[head], preferred_element_type=jnp.float32)  # (B, block, Lk)
        if mask is not None:
            logits = _mask_logits(logits, mask[:, None, :])
        weights = jax.nn.softmax(logits * (d**-0.5), axis=-1).astype(v.dtype)
        return jnp.matmul(weights, vh[head])

    out = jax.lax.map(one, (jnp.arange(heads * n), qb))  # (H * n, B, block, d)
    return out.reshape(heads, n, b, block, d).transpose(2, 1, 3, 0, 4).reshape(b, lq, inner)


class Attention(nnx.Module):
    """Multi-head (self- or cross-) attention: to_q/to_k/to_v projections, attention, to_out.0.

    Args:
      query_dim: width of the query tokens (and of the output).
      cross_attention_dim: width of the context tokens; None for self-attention.
      heads, dim_head: heads * dim_head is the inner width.
      qkv_bias: bias on to_q/to_k/to_v (False in the U-Net, True in the VAE).
      upcast_attention: float32 q k^T (SD 2.x).
    """

    def __init__(
        self,
        query_dim: int,
        *,
        cross_attention_dim: int | None = None,
        heads: int,
        dim_head: int,
        qkv_bias: bool = False,
        upcast_attention: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.to_q = linear(query_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_k = linear(context_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_v = linear(context_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        # A list so the PyTorch key is `to_out.0` (diffusers' to_out.1 is a parameter-free dropout).
        self.to_out = nnx.List([linear(inner, query_dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x: (B, Lq, query_dim), context: (B, Lk, cross_attention_dim), or a (context, (B, Lk) bool mask) pair,
        or None (self-attention) -> (B, Lq, query_dim)."""
        mask = None
        if isinstance(context, tuple):
            context, mask = context
        context = x if context is None else context
        out = scaled_dot_product_attention(
            self.to_q(x),
            self.to_k(context),
            self.to_v(context),
            heads=self.heads,
            upcast=self.upcast_attention,
            mask=mask,
        )
        return self.to_out[0](out)


class SpatialSelfAttention(nnx.Module):
    """The VAE mid-block attention: GroupNorm, single-head self-attention over H*W tokens, residual.

    diffusers keys: group_norm, to_q, to_k, to_v (with bias), to_out.0.
    """

    def __init__(self, channels: int, *, groups: int = 32, eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(channels, groups, eps=eps, dtype=dtype, rngs=rngs)
        self.to_q = linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_k = linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_v = linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([linear(channels, channels, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        out = scaled_dot_product_attention(
            self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), heads=1, upcast=True
        )
        return x + self.to_out[0](out).reshape(b, h, w, c)


class GEGLU(nnx.Module):
    """Gated GELU: proj to 2*dim_out, split, value * gelu(gate) (exact erf GELU, as torch's default)."""

    def __init__(self, dim_in: int, dim_out: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = linear(dim_in, 2 * dim_out, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., dim_in) -> (..., dim_out)."""
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """GEGLU feed-forward, inner width 4*dim; `net` indices match diffusers (net.0.proj, net.2)."""

    def __init__(self, dim: int, *, mult: int = 4, dtype=jnp.float32, rngs: nnx.Rngs):
        inner = dim * mult
        self.net = nnx.List(
            [GEGLU(dim, inner, dtype=dtype, rngs=rngs), None, linear(inner, dim, dtype=dtype, rngs=rngs)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., dim) -> (..., dim)."""
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Pre-norm self-attention, cross-attention on the text context, and GEGLU feed-forward, each residual."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int,
        upcast_attention: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(heads=heads, dim_head=dim_head, upcast_attention=upcast_attention, dtype=dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.attn1 = Attention(dim, **kw)
        self.norm2 = LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **kw)
        self.norm3 = LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x: (B, L, dim), context: (B, Lc, cross_attention_dim) -> (B, L, dim)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """Spatial transformer: GroupNorm, project in, transformer blocks over H*W tokens, project out, residual.

    Args:
      in_channels: C of the feature map.
      heads, dim_head: inner width heads * dim_head.
      num_layers: transformer blocks.
      use_linear_projection: proj_in/proj_out as Linear (SD 2.x) instead of 1x1 Conv (SD 1.x).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int,
        num_layers: int = 1,
        groups: int = 32,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = heads * dim_head
        self.norm = GroupNorm(in_channels, groups, eps=1e-6, dtype=dtype, rngs=rngs)
        if use_linear_projection:
            self.proj_in = linear(in_channels, inner, dtype=dtype, rngs=rngs)
        else:
            self.proj_in = conv2d(in_channels, inner, 1, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner,
                    heads=heads,
                    dim_head=dim_head,
                    cross_attention_dim=cross_attention_dim,
                    upcast_attention=upcast_attention,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )
        if use_linear_projection:
            self.proj_out = linear(inner, in_channels, dtype=dtype, rngs=rngs)
        else:
            self.proj_out = conv2d(inner, in_channels, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x: (B, H, W, C), context: (B, Lc, cross_attention_dim) -> (B, H, W, C)."""
        b, h, w, _ = x.shape
        # A 1x1 conv and a linear layer act the same on NHWC; only their kernel shapes (checkpoint layout) differ.
        tokens = self.proj_in(self.norm(x))
        tokens = tokens.reshape(b, h * w, tokens.shape[-1])
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        out = self.proj_out(tokens.reshape(b, h, w, tokens.shape[-1]))
        return x + out
