"""Prompts to the U-Net's text conditioning: weighted chunk embeddings, negative/positive pairs, length buckets.

A prompt is tokenized with AUTOMATIC1111's syntax (`sd_jax.prompts`) into chunks of 75 tokens; each chunk is encoded
alone (an embedding never depends on which other prompts share a call), emphasis is applied with each chunk's mean
restored, and the chunks are concatenated. A prompt and its negative are padded to the same number of chunks with
the empty prompt's chunk, as AUTOMATIC1111 does; the images of a call are padded to one bucket of 1, 2, 4, 8, ...
chunks with masked tokens (cross-attention ignores them exactly), so a longer prompt compiles anew only when it
crosses a power of two.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sd_jax.prompts import tokenize_weighted, weighted_mean_restore

CACHE_SIZE = 256  # prompts whose embeddings a PromptEncoder keeps


def _text_embeddings(graphdef, state, input_ids, *, clip_skip: int):
    return nnx.merge(graphdef, state)(input_ids, clip_skip=clip_skip)


def bucket(chunks: int) -> int:
    """The chunk count a prompt of `chunks` chunks is padded to: the next power of two."""
    return 1 << (chunks - 1).bit_length()


class PromptEncoder:
    """A text encoder and its tokenizer, turning prompts into the U-Net's context."""

    def __init__(self, graphdef, state, tokenizer, config, dtype):
        """Args: graphdef, state: the text encoder (nnx); config: its `CLIPTextConfig`-like config; dtype: of the
        embeddings."""
        self.tokenizer = tokenizer
        self._cache: dict[tuple[str, int], jnp.ndarray] = {}
        self.state = state
        self.dtype = dtype
        self.length = config.max_position_embeddings  # tokens per chunk with start and end (77)
        self.width = config.hidden_size
        self._encode = jax.jit(functools.partial(_text_embeddings, graphdef), static_argnames=("clip_skip",))
        self._emphasis = jax.jit(weighted_mean_restore)

    @property
    def state(self):
        """The text encoder's weights; setting new ones forgets the embeddings computed with the old."""
        return self._state

    @state.setter
    def state(self, state) -> None:
        self._state = state
        self._cache.clear()

    def tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, weights), both (n_chunks, 77)."""
        return tokenize_weighted(self.tokenizer, text, chunk_length=self.length - 2)

    def chunk_count(self, text: str) -> int:
        """How many 75-token chunks the prompt takes (no encoder run)."""
        return len(self.tokenize(text)[0])

    def pair_bucket(self, pairs: Sequence[tuple[str, str]]) -> int:
        """The bucket (in chunks) the images of these (positive, negative) prompts are padded to together."""
        return bucket(max(max(self.chunk_count(p), self.chunk_count(n)) for p, n in pairs))

    def shapes_only(self, pairs: Iterable[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray | None]:
        """`contexts`' arrays as zeros of their shapes and dtype (tokenizing only): what shapes a call."""
        pairs = list(pairs)
        length = self.pair_bucket(pairs) * self.length
        contexts = np.broadcast_to(np.zeros((), jnp.dtype(self.dtype)), (len(pairs), 2, length, self.width))
        mask = None if length == self.length else np.ones((len(pairs), 2, length), bool)
        return contexts, mask

    def chunks(self, text: str, clip_skip: int) -> jnp.ndarray:
        """(n_chunks, 77, D) weighted chunk embeddings of a prompt. The text encoder checks `clip_skip` (a one-line
        ValueError). The last CACHE_SIZE prompts' embeddings are kept (a batch job's negative prompts, repeats)."""
        key = (text, clip_skip)
        if key in self._cache:
            self._cache[key] = self._cache.pop(key)  # most recently used last
            return self._cache[key]
        chunks = self._encode_chunks(text, clip_skip)
        self._cache[key] = chunks
        if len(self._cache) > CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        return chunks

    def _encode_chunks(self, text: str, clip_skip: int) -> jnp.ndarray:
        ids, weights = self.tokenize(text)
        chunks = jnp.concatenate(
            [self._encode(self.state, jnp.asarray(ids[i : i + 1]), clip_skip=clip_skip) for i in range(len(ids))]
        )
        if np.all(weights == 1.0):
            return chunks
        return self._emphasis(chunks, jnp.asarray(weights))

    def contexts(
        self, positives: Sequence[str], negatives: Sequence[str], clip_skip: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-image [negative, positive] embeddings (n, 2, L, D) and, when padded, the token mask (n, 2, L).

        L is 77 times the bucket of the longest pair; a pair's own chunks come first, the rest is masked.
        """

        def chunks(text: str) -> jnp.ndarray:
            return self.chunks(text, clip_skip)

        pairs = []
        for positive, negative in zip(positives, negatives, strict=True):
            pos, neg = chunks(positive), chunks(negative)
            n = max(len(pos), len(neg))
            pos, neg = (jnp.concatenate([c] + [chunks("")] * (n - len(c))) for c in (pos, neg))
            pairs.append(jnp.stack([neg, pos]))
        counts = [len(p[0]) for p in pairs]
        padded = bucket(max(counts))
        contexts = np.zeros((len(pairs), 2, padded * self.length, self.width), jnp.dtype(self.dtype))
        mask = np.zeros((len(pairs), 2, padded * self.length), bool)
        for i, pair in enumerate(pairs):
            contexts[i, :, : counts[i] * self.length] = np.asarray(pair).reshape(2, -1, self.width)
            mask[i, :, : counts[i] * self.length] = True
        return contexts, (None if padded == 1 else mask)
