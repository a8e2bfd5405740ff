"""The CLIP text encoder of Stable Diffusion (OpenAI ViT-L/14 for SD 1.x, OpenCLIP ViT-H/14 for SD 2.x).

Attribute names mirror `transformers.CLIPTextModel` without its `text_model.` level; mapping checkpoint names onto
them is the converter's business (`sd_jax.convert.params`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# What transformers' CLIPTextConfig assumes for a key a config.json leaves out.
_TRANSFORMERS_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}

# transformers' ACT2FN names -> our activation. "gelu" there is the exact, erf-based GELU (torch's default).
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

_MODEL_TYPES = ("clip_text_model",)
_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text transformer.

    hidden_act is "quick_gelu" for SD 1.x (OpenAI CLIP ViT-L/14) and "gelu" (exact, erf-based) for SD 2.x
    (OpenCLIP ViT-H/14). The token ids and projection_dim do not change the computation; they are kept so that
    `to_dict()` round-trips a transformers config.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        """Reads a transformers CLIPTextConfig `config.json` dict; keys that do not shape the model are ignored.

        Raises:
          ValueError: for a config of another model (e.g. a full CLIPConfig with a vision tower), an unknown
            activation, or inconsistent sizes.
        """
        model_type = d.get("model_type")
        if model_type is not None and model_type not in _MODEL_TYPES:
            hint = " (a full CLIP config: pass its 'text_config' instead)" if "text_config" in d else ""
            raise ValueError(f"not a CLIP text model config: model_type {model_type!r}{hint}")
        for arch in d.get("architectures") or ():
            if arch not in _ARCHITECTURES:
                raise ValueError(f"unsupported architecture {arch!r}; supported: {list(_ARCHITECTURES)}")
        kwargs = {}
        for field in dataclasses.fields(cls):
            value = d.get(field.name)
            kwargs[field.name] = _TRANSFORMERS_DEFAULTS[field.name] if value is None else value
        if isinstance(kwargs["eos_token_id"], list | tuple):
            # A config value we do not support, not a wrong argument type: ValueError like the other checks.
            raise ValueError(f"several eos_token_id values are not supported: {kwargs['eos_token_id']}")  # noqa: TRY004
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "projection_dim",
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
        ):
            kwargs[name] = int(kwargs[name])
        kwargs["layer_norm_eps"] = float(kwargs["layer_norm_eps"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Keyword arguments for `transformers.CLIPTextConfig(**...)` (and our own config JSON)."""
        return dataclasses.asdict(self)


def _layer_norm(norm: nnx.LayerNorm, x: jax.Array) -> jax.Array:
    """Layer norm computed in float32 (stable in bf16 inference), cast back to the input dtype."""
    return norm(x.astype(jnp.float32)).astype(x.dtype)


class CLIPTextEmbeddings(nnx.Module):
    """Token plus learned absolute position embeddings."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.token_embedding = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype, embedding_init=init, rngs=rngs
        )
        self.position_embedding = nnx.Embed(
            config.max_position_embeddings,
            config.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=init,
            rngs=rngs,
        )

    def __call__(self, input_ids: jax.Array, extra_embeddings: jax.Array | None = None) -> jax.Array:
        """(B, L) int -> (B, L, D).

        Args:
          input_ids: token ids; with `extra_embeddings`, an id v + k (v the vocabulary size) is row k of that table.
          extra_embeddings: optional (K, D) vectors that extend the vocabulary (textual-inversion embeddings). The
            table is an argument, not a parameter: new values of the same shape need no new compilation.
        """
        length = input_ids.shape[-1]
        positions = self.position_embedding(jnp.arange(length, dtype=jnp.int32))
        if extra_embeddings is None:
            return self.token_embedding(input_ids) + positions[None]
        vocab_size = self.token_embedding.num_embeddings
        is_extra = input_ids >= vocab_size
        tokens = self.token_embedding(jnp.where(is_extra, 0, input_ids))
        rows = jnp.clip(input_ids - vocab_size, 0, extra_embeddings.shape[0] - 1)
        extra = jnp.take(extra_embeddings.astype(tokens.dtype), rows, axis=0)
        return jnp.where(is_extra[..., None], extra, tokens) + positions[None]


class CLIPAttention(nnx.Module):
    """Causal multi-head self-attention with separate q/k/v projections (transformers' layout)."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        d = config.hidden_size

        def linear():
            return nnx.Linear(d, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.q_proj = linear()
        self.k_proj = linear()
        self.v_proj = linear()
        self.out_proj = linear()

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, L, D) -> (B, L, D); position i attends to positions <= i."""
        b, length, _ = x.shape
        shape = (b, length, self.num_heads, self.head_dim)
        q = self.q_proj(x).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        # Logits and softmax in float32 whatever the compute dtype, as transformers does.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits * jnp.float32(self.head_dim**-0.5)
        causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, self.num_heads * self.head_dim)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.activation = config.hidden_act
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.fc1 = nnx.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.fc2 = nnx.Linear(config.intermediate_size, config.hidden_size, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_ACTIVATIONS[self.activation](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        norm = {"epsilon": config.layer_norm_eps, "dtype": jnp.float32, "param_dtype": param_dtype, "rngs": rngs}
        self.self_attn = CLIPAttention(config, **kw)
        self.layer_norm1 = nnx.LayerNorm(config.hidden_size, **norm)
        self.mlp = CLIPMLP(config, **kw)
        self.layer_norm2 = nnx.LayerNorm(config.hidden_size, **norm)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(_layer_norm(self.layer_norm1, x))
        return x + self.mlp(_layer_norm(self.layer_norm2, x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )


class CLIPTextModel(nnx.Module):
    """CLIP text transformer: token ids (B, L) -> per-token embeddings (B, L, D) for U-Net cross-attention.

    Args:
      config: the architecture.
      dtype: compute dtype (float32, or bfloat16 for inference; attention softmax and layer norms stay float32).
      param_dtype: dtype of freshly initialised parameters (a loaded state brings its own); defaults to `dtype`.
      rngs: initialisation randomness (use `nnx.eval_shape` to build an abstract model for loading).
    """

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        param_dtype = dtype if param_dtype is None else param_dtype
        self.config = config
        self.dtype = dtype
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, **kw)
        self.final_layer_norm = nnx.LayerNorm(
            config.hidden_size, epsilon=config.layer_norm_eps, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs
        )

    def _check_ids(self, input_ids: jax.Array) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )

    def _check_extra(self, extra_embeddings: jax.Array | None) -> None:
        d = self.config.hidden_size
        if extra_embeddings is not None and (extra_embeddings.ndim != 2 or extra_embeddings.shape[1] != d):
            raise ValueError(f"extra_embeddings must be (K, {d}), got shape {extra_embeddings.shape}")

    def _run(self, input_ids: jax.Array, num_layers: int, extra_embeddings: jax.Array | None) -> list[jax.Array]:
        self._check_ids(input_ids)
        self._check_extra(extra_embeddings)
        x = self.embeddings(input_ids, extra_embeddings).astype(self.dtype)
        states = [x]
        for layer in self.encoder.layers[:num_layers]:
            x = layer(x)
            states.append(x)
        return states

    def hidden_states(self, input_ids: jax.Array, extra_embeddings: jax.Array | None = None) -> list[jax.Array]:
        """All hidden states before the final layer norm: [embeddings, layer 1 output, ..., layer N output]."""
        return self._run(input_ids, self.config.num_hidden_layers, extra_embeddings)

    def __call__(
        self, input_ids: jax.Array, *, clip_skip: int = 1, extra_embeddings: jax.Array | None = None
    ) -> jax.Array:
        """Text embeddings for the U-Net.

        Args:
          input_ids: (B, L) integer token ids, L <= max_position_embeddings.
          clip_skip: static; 1 gives the usual last_hidden_state, 2 the penultimate layer's output through the
            final layer norm (AUTOMATIC1111's "CLIP skip"), and so on. The layers after it are not computed.
          extra_embeddings: optional (K, D) token vectors (textual-inversion embeddings) that ids from vocab_size up
            index (see `CLIPTextEmbeddings`); None leaves the program as it is without them.

        Returns:
          (B, L, D) in the compute dtype: final_layer_norm(hidden_states[-clip_skip]).
        """
        n = self.config.num_hidden_layers
        if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 1 <= clip_skip <= n:
            raise ValueError(f"clip_skip must be an int in [1, {n}] (the number of layers), got {clip_skip!r}")
        x = self._run(input_ids, n + 1 - clip_skip, extra_embeddings)[-1]
        return _layer_norm(self.final_layer_norm, x)
