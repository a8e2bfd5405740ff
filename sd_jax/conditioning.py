"""Prompts to the U-Net's text conditioning: weighted chunk embeddings, negative/positive pairs, length buckets.

A prompt is tokenized with AUTOMATIC1111's syntax (`sd_jax.prompts`) into chunks of 75 tokens; each chunk is encoded
alone (an embedding never depends on which other prompts share a call), emphasis is applied with each chunk's mean
restored, and the chunks are concatenated. A prompt and its negative are padded to the same number of chunks with
the empty prompt's chunk, as AUTOMATIC1111 does; the images of a call are padded to one bucket of 1, 2, 4, 8, ...
chunks with masked tokens (cross-attention ignores them exactly), so a longer prompt compiles anew only when it
crosses a power of two.

Textual-inversion embeddings (`PromptEncoder.embeddings`, a `sd_jax.embeddings.EmbeddingLibrary`) reach the text
encoder as a table of the prompt's embedding vectors, an argument of the compiled encoder padded to one of a few
sizes (`table_bucket`): other embeddings of a similar size reuse the program. A prompt without embeddings runs the
program it runs without a library.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sd_jax import compile_cache
from sd_jax.embeddings import EmbeddingLibrary, EmbeddingVocabulary
from sd_jax.prompts import TokenizedPrompt, tokenize_prompt, weighted_mean_restore

CACHE_SIZE = 256  # prompts whose embeddings a PromptEncoder keeps
TABLE_BUCKET_BASE = 16  # the embedding tables' rows: 16, 64, 256, ...


def _text_embeddings(graphdef, state, input_ids, extra_embeddings, *, clip_skip: int):
    return nnx.merge(graphdef, state)(input_ids, clip_skip=clip_skip, extra_embeddings=extra_embeddings)


def bucket(chunks: int) -> int:
    """The chunk count a prompt of `chunks` chunks is padded to: the next power of two."""
    return 1 << (chunks - 1).bit_length()


def table_bucket(vectors: int) -> int:
    """The rows a prompt's table of `vectors` embedding vectors is padded to: 16, 64, 256, ... (powers of 4)."""
    rows = TABLE_BUCKET_BASE
    while rows < vectors:
        rows *= 4
    return rows


class PromptEncoder:
    """A text encoder and its tokenizer, turning prompts into the U-Net's context."""

    def __init__(self, graphdef, state, tokenizer, config, dtype):
        """Args: graphdef, state: the text encoder (nnx); config: its `CLIPTextConfig`-like config; dtype: of the
        embeddings."""
        self.tokenizer = tokenizer
        self._cache: dict[tuple, jnp.ndarray] = {}
        self._embeddings: EmbeddingLibrary | None = None
        self.state = state
        self.dtype = dtype
        self.length = config.max_position_embeddings  # tokens per chunk with start and end (77)
        self.width = config.hidden_size
        self.vocab_size = config.vocab_size  # embedding vectors get the ids from here up
        self._encode = compile_cache.shared_jit(_text_embeddings, graphdef, static_argnames=("clip_skip",))
        self._emphasis = jax.jit(weighted_mean_restore)

    @property
    def state(self):
        """The text encoder's weights; setting new ones forgets the embeddings computed with the old."""
        return self._state

    @state.setter
    def state(self, state) -> None:
        self._state = state
        self._cache.clear()

    @property
    def embeddings(self) -> EmbeddingLibrary | None:
        """The textual-inversion embeddings prompts may name (None: none); setting it forgets the prompts' embeddings
        computed before."""
        return self._embeddings

    @embeddings.setter
    def embeddings(self, library: EmbeddingLibrary | None) -> None:
        self._embeddings = library
        self._cache.clear()

    def _vocabulary(self) -> EmbeddingVocabulary | None:
        """The library's names as they are on disk now (the folder is listed again)."""
        return None if self._embeddings is None else self._embeddings.vocabulary(self.tokenizer, self.width)

    def _tokenize(self, text: str, vocabulary: EmbeddingVocabulary | None) -> TokenizedPrompt:
        return tokenize_prompt(
            self.tokenizer, text, chunk_length=self.length - 2, embeddings=vocabulary, first_extra_id=self.vocab_size
        )

    def tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, weights), both (n_chunks, 77); ids from `vocab_size` up are embedding vectors."""
        tokens = self._tokenize(text, self._vocabulary())
        return tokens.ids, tokens.weights

    def chunk_count(self, text: str) -> int:
        """How many 75-token chunks the prompt takes (no encoder run)."""
        return len(self.tokenize(text)[0])

    def pair_bucket(self, pairs: Sequence[tuple[str, str]]) -> int:
        """The bucket (in chunks) the images of these (positive, negative) prompts are padded to together."""
        vocabulary = self._vocabulary()
        return bucket(max(len(self._tokenize(text, vocabulary).ids) for pair in pairs for text in pair))

    def used_embeddings(self, texts: Iterable[str]) -> dict[str, Path]:
        """The embeddings these prompts name, by name in order of first use, with their files (for an image's
        "TI hashes").

        Raises:
          EmbeddingError: a named embedding's file is unusable (see `sd_jax.embeddings`).
        """
        vocabulary = self._vocabulary()
        if vocabulary is None:
            return {}
        used: dict[str, Path] = {}
        for text in texts:
            for name in self._tokenize(text, vocabulary).embeddings:
                used.setdefault(name, vocabulary.path(name))
        return used

    def shapes_only(self, pairs: Iterable[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray | None]:
        """`contexts`' arrays as zeros of their shapes and dtype (tokenizing only): what shapes a call."""
        pairs = list(pairs)
        length = self.pair_bucket(pairs) * self.length
        contexts = np.broadcast_to(np.zeros((), jnp.dtype(self.dtype)), (len(pairs), 2, length, self.width))
        mask = None if length == self.length else np.ones((len(pairs), 2, length), bool)
        return contexts, mask

    def chunks(self, text: str, clip_skip: int) -> jnp.ndarray:
        """(n_chunks, 77, D) weighted chunk embeddings of a prompt. The text encoder checks `clip_skip` (a one-line
        ValueError); an unusable embedding the prompt names is an EmbeddingError. The last CACHE_SIZE prompts'
        embeddings are kept (a batch job's negative prompts, repeats), each with the embeddings folder as it was."""
        return self._chunks(text, clip_skip, self._vocabulary())

    def _chunks(self, text: str, clip_skip: int, vocabulary: EmbeddingVocabulary | None) -> jnp.ndarray:
        key = (text, clip_skip, None if vocabulary is None else vocabulary.key)
        if key in self._cache:
            self._cache[key] = self._cache.pop(key)  # most recently used last
            return self._cache[key]
        chunks = self._encode_chunks(self._tokenize(text, vocabulary), vocabulary, clip_skip)
        self._cache[key] = chunks
        if len(self._cache) > CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        return chunks

    def _embedding_table(self, names: Sequence[str], vocabulary: EmbeddingVocabulary) -> jnp.ndarray:
        """The vectors of these embeddings, concatenated and padded with zero rows to `table_bucket` rows, (K, D) in
        the text encoder's parameter dtype: the `extra_embeddings` of a prompt whose `TokenizedPrompt.embeddings` they
        are."""
        vectors = np.concatenate([vocabulary.vectors(name) for name in names])
        dtype = self.state["embeddings"]["token_embedding"]["embedding"].dtype
        table = np.zeros((table_bucket(len(vectors)), self.width), np.float32)
        table[: len(vectors)] = vectors
        return jnp.asarray(table, dtype)

    def _encode_chunks(
        self, tokens: TokenizedPrompt, vocabulary: EmbeddingVocabulary | None, clip_skip: int
    ) -> jnp.ndarray:
        table = self._embedding_table(tokens.embeddings, vocabulary) if tokens.embeddings else None
        ids = tokens.ids
        chunks = jnp.concatenate(
            [self._encode(self.state, jnp.asarray(ids[i : i + 1]), table, clip_skip=clip_skip) for i in range(len(ids))]
        )
        if np.all(tokens.weights == 1.0):
            return chunks
        return self._emphasis(chunks, jnp.asarray(tokens.weights))

    def compiled_count(self) -> int:
        """Programs the text encoder has compiled (one per clip_skip and embedding-table size in use)."""
        return self._encode._cache_size()

    def contexts(
        self, positives: Sequence[str], negatives: Sequence[str], clip_skip: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-image [negative, positive] embeddings (n, 2, L, D) and, when padded, the token mask (n, 2, L).

        L is 77 times the bucket of the longest pair; a pair's own chunks come first, the rest is masked.
        """

        vocabulary = self._vocabulary()  # the folder is listed once per call

        def chunks(text: str) -> jnp.ndarray:
            return self._chunks(text, clip_skip, vocabulary)

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
