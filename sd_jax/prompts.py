"""Prompt emphasis as AUTOMATIC1111's web UI reads it: `(word)`, `[word]`, `(word:1.3)`, `BREAK`, 75-token chunks.

Text flows: `parse_emphasis` (text -> pieces with weights) -> `tokenize_prompt` (pieces -> (n_chunks, 77) token
ids and per-token weights) -> the text encoder, once per chunk -> `weighted_mean_restore` (the weights applied to the
encoder output, each chunk's mean kept). The chunk embeddings are then concatenated along the token axis.

Textual-inversion embeddings (`sd_jax.embeddings`) are found in each piece's tokens as AUTOMATIC1111 finds them: where
the tokens spell an embedding's name, its n vectors take the place of those tokens, as n ids from `first_extra_id` up
that the text encoder looks up in a table of the prompt's embedding vectors. An embedding is never split between
chunks: one that does not fit in what is left of a chunk starts the next.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    import jax
    import transformers

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1
BREAK = "BREAK"
BREAK_WEIGHT = -1.0
COMMA_TOKEN = ",</w>"
# `weighted_mean_restore` skips the rescale when a mean is below this fraction of the values' RMS.
MEAN_RESTORE_MIN = 1e-3

Token = tuple[int, float]  # (token id, weight)

# One lexical unit of a prompt per match, tried in this order:
#   a backslash and the bracket or backslash it escapes (a lone backslash escapes nothing and vanishes),
#   an opening bracket, an explicit weight that closes a round bracket `:1.3)`, a closing bracket,
#   a run of plain text, or a `:` that does not start a weight.
# The number only matches what `float` reads (at most one dot, at least one digit), so `(a:1.2.3)` is plain text
# `a:1.2.3` in a round bracket instead of an error.
_EMPHASIS_TOKEN = re.compile(
    r"""
    (?P<escape>\\[()\[\]\\]?)
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(rf"\s*\b{BREAK}\b\s*", re.DOTALL)


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Splits a prompt into pieces of text and their emphasis weights.

    `(x)` multiplies the weight of `x` by 1.1, `[x]` divides it by 1.1, `(x:w)` multiplies it by `w`; nested brackets
    multiply. `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal characters. A closing bracket without an opener is
    plain text; an opener never closed weights everything after it. The word `BREAK` becomes the piece
    `("BREAK", -1.0)`, with the whitespace around it dropped. Adjacent pieces of equal weight are merged.

    Returns:
      [(text, weight), ...], never empty: an empty prompt gives `[("", 1.0)]`.
    """
    pieces: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    round_openers: list[int] = []  # index in `pieces` where each open bracket starts
    square_openers: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= multiplier

    for match in _EMPHASIS_TOKEN.finditer(text):
        token = match.group(0)
        if match.group("escape") is not None:
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_openers.append(len(pieces))
        elif token == "[":
            square_openers.append(len(pieces))
        elif match.group("weight") is not None and round_openers:
            multiply_from(round_openers.pop(), float(match.group("weight")))
        elif token == ")" and round_openers:
            multiply_from(round_openers.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and square_openers:
            multiply_from(square_openers.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            # Plain text, or a bracket (or weight) with nothing to close: literal.
            for i, part in enumerate(_BREAK_SPLIT.split(token)):
                if i > 0:
                    pieces.append([BREAK, BREAK_WEIGHT])
                pieces.append([part, 1.0])

    # Unclosed brackets reach to the end of the prompt: all round ones, then all square ones, each in opening order.
    for start in round_openers:
        multiply_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in square_openers:
        multiply_from(start, SQUARE_BRACKET_MULTIPLIER)

    merged: list[tuple[str, float]] = []
    for piece_text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]


def split_into_chunks(
    stream: Sequence[Token | list[Token] | None], chunk_length: int, comma_id: int, comma_backtrack: int
) -> list[list[Token]]:
    """Cuts a stream of (token id, weight) into chunks of at most `chunk_length` tokens; `None` is a BREAK, a list
    of tokens is an embedding's vectors, which stay together.

    A full chunk is closed when one more token arrives. If its last comma is at most `comma_backtrack` tokens
    from its end, it is closed right after that comma instead and the tokens after the comma open the next chunk
    (0 turns this off). A comma that arrives when the chunk is already full opens the next chunk and is not
    remembered as a break point. A BREAK closes the current chunk, even an empty one. An embedding that does not
    fit in what is left of the chunk closes it (without looking for a comma, as AUTOMATIC1111 does) and opens the
    next; one longer than `chunk_length` is a ValueError.

    Returns:
      the chunks, unpadded; at least one (an empty stream gives one empty chunk).
    """
    chunks: list[list[Token]] = []
    chunk: list[Token] = []
    last_comma = -1  # index of the last comma in `chunk`
    for item in stream:
        if item is None:
            chunks.append(chunk)
            chunk, last_comma = [], -1
            continue
        tokens = item if isinstance(item, list) else [item]
        if len(tokens) > chunk_length:
            raise ValueError(f"an embedding of {len(tokens)} vectors does not fit a chunk of {chunk_length} tokens")
        if tokens[0][0] == comma_id:
            last_comma = len(chunk)
        elif (
            comma_backtrack > 0
            and len(chunk) == chunk_length
            and last_comma != -1
            and len(chunk) - last_comma <= comma_backtrack
        ):
            chunks.append(chunk[: last_comma + 1])
            chunk, last_comma = chunk[last_comma + 1 :], -1
        if len(chunk) + len(tokens) > chunk_length:
            chunks.append(chunk)
            chunk, last_comma = [], -1
        chunk.extend(tokens)
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


def frame_chunk(
    chunk: list[Token], chunk_length: int, start_id: int, end_id: int, pad_id: int
) -> tuple[list[int], list[float]]:
    """One chunk as the text encoder takes it: start, tokens, end tokens up to `chunk_length`, end.

    Everything after the first end token then becomes `pad_id` (SD 2 pads with `!`, SD 1 with the end token).
    Start, end and padding have weight 1.0.

    Returns:
      (ids, weights), each of length `chunk_length + 2`.
    """
    n_fill = chunk_length - len(chunk)
    ids = [start_id] + [token for token, _ in chunk] + [end_id] * n_fill + [end_id]
    weights = [1.0] + [weight for _, weight in chunk] + [1.0] * n_fill + [1.0]
    if pad_id != end_id:
        first_end = ids.index(end_id)
        ids[first_end + 1 :] = [pad_id] * (len(ids) - first_end - 1)
    return ids, weights


class EmbeddingMatcher(Protocol):
    """Names that stand for learned vectors (`sd_jax.embeddings.EmbeddingVocabulary` is one)."""

    def match(self, tokens: Sequence[int], position: int) -> tuple[str, int] | None:
        """The name whose tokens start at `tokens[position]` and how many tokens it spans, or None."""
        ...

    def vector_count(self, name: str) -> int:
        """How many vectors (token positions) the name stands for."""
        ...


@dataclasses.dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt as the text encoder takes it.

    Attributes:
      ids: (n_chunks, chunk_length + 2) int32 token ids. Ids from `first_extra_id` up are embedding vectors:
        `id - first_extra_id` indexes the vectors of `embeddings`, concatenated in that order.
      weights: (n_chunks, chunk_length + 2) float32 emphasis weights.
      embeddings: the names of the embeddings the prompt uses, in order of first use.
    """

    ids: np.ndarray
    weights: np.ndarray
    embeddings: tuple[str, ...] = ()


def tokenize_prompt(
    tokenizer: transformers.PreTrainedTokenizerBase,
    text: str,
    *,
    chunk_length: int = 75,
    comma_backtrack: int = 20,
    embeddings: EmbeddingMatcher | None = None,
    first_extra_id: int | None = None,
) -> TokenizedPrompt:
    """A prompt with emphasis and embeddings as token ids and per-token weights, in chunks of `chunk_length` tokens.

    Each piece of `parse_emphasis(text)` is tokenized on its own and its tokens carry its weight. Within a piece,
    each position is tried against `embeddings` (the longest name first); a name found becomes its embedding's
    vectors, all with the piece's weight, so `(name:1.2)` weights an embedding like any word. A name is not found
    across pieces (`na(me)` is not `name`). Chunks are cut as `split_into_chunks` describes and framed by
    `frame_chunk`.

    Args:
      tokenizer: a CLIP tokenizer (its start, end and pad tokens and `,</w>` are used).
      text: one prompt.
      chunk_length: text tokens per chunk (75, so that a chunk with start and end is the encoder's 77).
      comma_backtrack: how far back a comma may be to end a full chunk early; 0 disables it.
      embeddings: the embeddings' names; None finds none.
      first_extra_id: the id of the first embedding vector: the text encoder's vocabulary size (default: the
        tokenizer's).

    Raises:
      ValueError: an embedding with more vectors than a chunk holds; whatever `embeddings.vector_count` raises
        (`sd_jax.embeddings.EmbeddingError` for an unusable file).
    """
    pieces = parse_emphasis(text)
    piece_ids = tokenizer([piece for piece, _ in pieces], add_special_tokens=False, verbose=False)["input_ids"]
    next_id = len(tokenizer) if first_extra_id is None else first_extra_id
    slots: dict[str, range] = {}  # embedding name -> its vectors' ids
    stream: list[Token | list[Token] | None] = []
    for (piece, weight), ids in zip(pieces, piece_ids, strict=True):
        if piece == BREAK and weight == BREAK_WEIGHT:
            stream.append(None)
            continue
        position = 0
        while position < len(ids):
            found = None if embeddings is None else embeddings.match(ids, position)
            if found is None:
                stream.append((int(ids[position]), weight))
                position += 1
                continue
            name, span = found
            if name not in slots:
                slots[name] = range(next_id, next_id + embeddings.vector_count(name))
                next_id = slots[name].stop
            if len(slots[name]) > chunk_length:
                raise ValueError(f"embedding {name!r}: {len(slots[name])} vectors, more than a chunk's {chunk_length}")
            stream.append([(token, weight) for token in slots[name]])
            position += span

    comma_id = tokenizer.convert_tokens_to_ids(COMMA_TOKEN)
    chunks = split_into_chunks(stream, chunk_length, comma_id, comma_backtrack)
    framed = [
        frame_chunk(chunk, chunk_length, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        for chunk in chunks
    ]
    ids = np.array([chunk_ids for chunk_ids, _ in framed], dtype=np.int32)
    weights = np.array([chunk_weights for _, chunk_weights in framed], dtype=np.float32)
    return TokenizedPrompt(ids, weights, tuple(slots))


def tokenize_weighted(
    tokenizer: transformers.PreTrainedTokenizerBase,
    text: str,
    *,
    chunk_length: int = 75,
    comma_backtrack: int = 20,
) -> tuple[np.ndarray, np.ndarray]:
    """`tokenize_prompt` without embeddings: (ids, weights), int32 and float32, both (n_chunks, chunk_length + 2)."""
    tokens = tokenize_prompt(tokenizer, text, chunk_length=chunk_length, comma_backtrack=comma_backtrack)
    return tokens.ids, tokens.weights


def weighted_mean_restore(z: jax.Array | np.ndarray, weights: jax.Array | np.ndarray) -> jax.Array:
    """Emphasis on text encoder output: each token's vector scaled by its weight, then each chunk rescaled so its
    mean over tokens and channels is what it was before (the web UI's default "Original" emphasis).

    Computed in float32, returned in `z`'s dtype; works inside `jax.jit`.

    Args:
      z: (..., T, D) encoder hidden states, e.g. (n_chunks, 77, D) for one prompt's chunks.
      weights: (..., T) per-token weights, as from `tokenize_weighted`.

    Returns:
      (..., T, D) like `z`. With all weights 1 it is `z` exactly. Where either mean is negligible next to the
      values (below `MEAN_RESTORE_MIN` of their root mean square) the rescale is skipped: a ratio of two near-zero
      means is noise that would blow the embeddings up (text encoders whose final layer norm has no bias give
      exactly such means; trained SD encoders do not).
    """
    z = jnp.asarray(z)
    z32 = z.astype(jnp.float32)
    original_mean = z32.mean(axis=(-2, -1), keepdims=True)
    weighted = z32 * jnp.asarray(weights).astype(jnp.float32)[..., None]
    new_mean = weighted.mean(axis=(-2, -1), keepdims=True)
    floor = MEAN_RESTORE_MIN * jnp.sqrt(jnp.mean(jnp.square(weighted), axis=(-2, -1), keepdims=True))
    usable = (jnp.abs(original_mean) > floor) & (jnp.abs(new_mean) > floor)
    ratio = jnp.where(usable, original_mean / jnp.where(usable, new_mean, 1.0), 1.0)
    return (weighted * ratio).astype(z.dtype)
