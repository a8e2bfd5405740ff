"""Prompt emphasis: the web UI's bracket syntax, 75-token chunking with comma backtracking and BREAK, and the
emphasis applied to encoder output with each chunk's mean restored."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import prompts
from sd_jax import tokenizer as tk

BPE = tk.find_bpe_vocab() if importlib.util.find_spec("open_clip") else None
needs_bpe = pytest.mark.skipif(BPE is None, reason="needs open-clip-torch's bpe_simple_vocab_16e6.txt.gz")

START, END = 49406, 49407
CAT, DOG, COMMA = 2368, 1929, 267  # "cat</w>", "dog</w>", ",</w>"

PARSE_CASES = [
    # The web UI's documented examples.
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    # Nesting and explicit weights.
    ("((word))", [("word", 1.1 * 1.1)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
    ("(a (b:1.2) c:0.8)", [("a ", 0.8), ("b", 1.2 * 0.8), (" c", 0.8)]),
    ("([x])", [("x", 1.0)]),
    ("(word:-1)", [("word", -1.0)]),
    ("(word:+.5)", [("word", 0.5)]),
    ("(word : 1.5 )", [("word ", 1.5)]),
    ("(word:1.5) rest", [("word", 1.5), (" rest", 1.0)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("a ((b) c", [("a ", 1.0), ("b", 1.21), (" c", 1.1)]),
    # Colons that are not weights are text.
    ("", [("", 1.0)]),
    ("a:b", [("a:b", 1.0)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),
    ("(a:.)", [("a:.", 1.1)]),
    # Escapes; a lone backslash escapes nothing and is dropped.
    ("\\\\", [("\\", 1.0)]),
    ("\\[x\\) (y)", [("[x) ", 1.0), ("y", 1.1)]),
    ("(\\(x\\))", [("(x)", 1.1)]),
    ("a\\b", [("ab", 1.0)]),
    ("\\", [("", 1.0)]),
    # A closer without an opener is plain text, as is a weight with no round bracket to close.
    ("word)", [("word)", 1.0)]),
    ("word]", [("word]", 1.0)]),
    (":)", [(":)", 1.0)]),
    ("a:1.2) b", [("a:1.2) b", 1.0)]),
    (")))(((", [(")))", 1.0)]),
    ("(:1.2)", [("", 1.0)]),
    ("[(]", [("", 1.0)]),
    ("(a]", [("a]", 1.1)]),
    # BREAK: a whole word, whitespace around it dropped; a BREAK inside brackets is weighted like any text.
    ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
    ("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a  BREAK\n b BREAK c", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0), ("BREAK", -1.0), ("c", 1.0)]),
    ("BREAKFAST break aBREAK", [("BREAKFAST break aBREAK", 1.0)]),
    ("(a) BREAK (b)", [("a", 1.1), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", 1.1)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
]


@pytest.mark.parametrize("text, expected", PARSE_CASES, ids=[repr(text) for text, _ in PARSE_CASES])
def test_parse_emphasis(text, expected):
    got = prompts.parse_emphasis(text)
    assert [piece for piece, _ in got] == [piece for piece, _ in expected]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=1e-12, atol=0)


def test_documented_weights_are_exact():
    got = dict(prompts.parse_emphasis("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert got["house"] == 1.5730000000000004 and got["sky"] == 1.4641000000000006 and got["hill"] == 0.55


@pytest.mark.parametrize("text", ["(((", "]]]", "\\\\\\", ":::", "(:)", "[:1]", "(a:1e5)", "(a:-)", "((x:2)y:3)]):"])
def test_garbage_never_crashes(text):
    got = prompts.parse_emphasis(text)
    assert got and all(isinstance(piece, str) and isinstance(w, float) for piece, w in got)


@pytest.fixture(scope="module")
def sd1_tokenizer():
    return tk.load_tokenizer(bpe_path=BPE)


@pytest.fixture(scope="module")
def sd2_tokenizer():
    return tk.load_tokenizer(bpe_path=BPE, pad_token="!")


def words(word: str, n: int) -> str:
    return " ".join([word] * n)


@needs_bpe
@pytest.mark.parametrize("n_tokens, n_chunks", [(0, 1), (1, 1), (75, 1), (76, 2), (150, 2), (151, 3)])
def test_chunk_count(sd1_tokenizer, n_tokens, n_chunks):
    text = words("cat", n_tokens)
    assert len(sd1_tokenizer(text, add_special_tokens=False)["input_ids"]) == n_tokens
    ids, weights = prompts.tokenize_weighted(sd1_tokenizer, text)
    assert ids.shape == weights.shape == (n_chunks, 77)
    assert ids.dtype == np.int32 and weights.dtype == np.float32
    assert (ids[:, 0] == START).all() and (ids[:, -1] == END).all()
    assert (ids == CAT).sum() == n_tokens
    assert (weights == 1.0).all()
    if n_tokens == 151:
        assert (ids[:2, 1:76] == CAT).all() and ids[2, 1] == CAT and (ids[2, 2:] == END).all()


@needs_bpe
@pytest.mark.parametrize("which", ["sd1", "sd2"])
@pytest.mark.parametrize(
    "text",
    [
        "a photo of a cat",
        "A  Photograph of an ASTRONAUT riding a horse, trending on artstation, 4k!!",
        "masterpiece, best quality: sharp focus",
        "",
        words("cat", 75),
    ],
)
def test_plain_prompt_matches_ordinary_tokenization(sd1_tokenizer, sd2_tokenizer, which, text):
    tokenizer = sd1_tokenizer if which == "sd1" else sd2_tokenizer
    ids, weights = prompts.tokenize_weighted(tokenizer, text)
    assert ids.shape == (1, 77)
    np.testing.assert_array_equal(ids[0], tk.tokenize(tokenizer, [text], 77)[0])
    assert (weights == 1.0).all()


@needs_bpe
def test_sd2_pads_after_the_end_token(sd2_tokenizer):
    ids, weights = prompts.tokenize_weighted(sd2_tokenizer, "a (cat) BREAK dog")
    assert ids.shape == (2, 77)
    assert ids[0, :4].tolist() == [START, 320, CAT, END] and (ids[0, 4:] == 0).all()
    assert ids[1, :3].tolist() == [START, DOG, END] and (ids[1, 3:] == 0).all()
    assert weights[0, 2] == np.float32(1.1) and (np.delete(weights, [2], axis=1) == 1.0).all()


@needs_bpe
def test_weights_follow_their_tokens(sd1_tokenizer):
    long_word = "xyzzyqwv"
    long_ids = sd1_tokenizer(long_word, add_special_tokens=False)["input_ids"]
    assert len(long_ids) > 1
    ids, weights = prompts.tokenize_weighted(sd1_tokenizer, f"a (cat:1.5) [dog] (({long_word})) cat")
    n = len(long_ids)
    assert ids[0, : 5 + n].tolist() == [START, 320, CAT, DOG, *long_ids, CAT]
    expected = [1.0, 1.0, 1.5, 1 / 1.1, *[1.1 * 1.1] * n, 1.0]
    np.testing.assert_allclose(weights[0, : 5 + n], np.float32(expected), rtol=0, atol=0)
    assert (ids[0, 5 + n :] == END).all() and (weights[0, 5 + n :] == 1.0).all()


@needs_bpe
def test_weights_follow_tokens_into_the_next_chunk(sd1_tokenizer):
    ids, weights = prompts.tokenize_weighted(sd1_tokenizer, f"{words('cat', 74)} (dog dog:0.5)")
    assert ids.shape == (2, 77)
    assert ids[0, 75] == DOG and weights[0, 75] == 0.5 and (weights[0, :75] == 1.0).all()
    assert ids[1, 1] == DOG and weights[1, 1] == 0.5 and (weights[1, 2:] == 1.0).all()


@needs_bpe
def test_comma_near_the_end_moves_the_rest_to_the_next_chunk(sd1_tokenizer):
    text = f"{words('cat', 70)}, {words('dog', 10)}"
    assert len(sd1_tokenizer(text, add_special_tokens=False)["input_ids"]) == 81
    ids, _ = prompts.tokenize_weighted(sd1_tokenizer, text)
    assert ids.shape == (2, 77)
    assert (ids[0, 1:71] == CAT).all() and ids[0, 71] == COMMA and (ids[0, 72:] == END).all()
    assert (ids[1, 1:11] == DOG).all() and (ids[1, 11:] == END).all()

    # Backtracking off: a hard cut after 75 tokens.
    ids, _ = prompts.tokenize_weighted(sd1_tokenizer, text, comma_backtrack=0)
    assert ids[0, 71] == COMMA and (ids[0, 72:76] == DOG).all() and ids[0, 76] == END
    assert (ids[1, 1:7] == DOG).all() and (ids[1, 7:] == END).all()


@needs_bpe
@pytest.mark.parametrize("n_before, moved", [(55, True), (54, False), (50, False)])
def test_comma_backtrack_limit(sd1_tokenizer, n_before, moved):
    """The comma at index `n_before` of a full 75-token chunk is `75 - n_before` tokens from its end."""
    text = f"{words('cat', n_before)}, {words('dog', 30)}"
    ids, _ = prompts.tokenize_weighted(sd1_tokenizer, text)
    assert ids.shape == (2, 77)
    assert ids[0, 1 + n_before] == COMMA
    if moved:
        assert (ids[0, 2 + n_before :] == END).all()
        assert (ids[1, 1:31] == DOG).all() and ids[1, 31] == END
    else:
        assert (ids[0, 2 + n_before : 76] == DOG).all()
        n_left = 30 - (74 - n_before)
        assert (ids[1, 1 : 1 + n_left] == DOG).all() and ids[1, 1 + n_left] == END


@needs_bpe
def test_comma_position_is_per_chunk(sd1_tokenizer):
    """A comma in the first chunk gives no break point in the second."""
    text = f"{words('cat', 70)}, {words('dog', 140)}"
    ids, _ = prompts.tokenize_weighted(sd1_tokenizer, text)
    assert ids.shape == (3, 77)
    assert ids[0, 71] == COMMA and (ids[0, 72:] == END).all()
    assert (ids[1, 1:76] == DOG).all()
    assert (ids[2, 1:66] == DOG).all() and (ids[2, 66:] == END).all()


@needs_bpe
def test_break_starts_a_new_chunk(sd1_tokenizer):
    ids, _ = prompts.tokenize_weighted(sd1_tokenizer, "cat BREAK dog")
    assert ids[:, :3].tolist() == [[START, CAT, END], [START, DOG, END]]

    # A leading BREAK leaves an empty first chunk; a trailing one adds nothing.
    ids, _ = prompts.tokenize_weighted(sd1_tokenizer, "BREAK dog")
    assert ids.shape == (2, 77) and (ids[0, 1:] == END).all() and ids[1, 1] == DOG
    ids, _ = prompts.tokenize_weighted(sd1_tokenizer, "dog BREAK")
    assert ids.shape == (1, 77) and ids[0, 1] == DOG

    # A full chunk followed by BREAK is closed once, not twice.
    ids, _ = prompts.tokenize_weighted(sd1_tokenizer, f"{words('cat', 75)} BREAK dog")
    assert ids.shape == (2, 77) and (ids[0, 1:76] == CAT).all() and ids[1, 1] == DOG

    # Twice in a row: an empty chunk between.
    ids, _ = prompts.tokenize_weighted(sd1_tokenizer, "cat BREAK BREAK dog")
    assert ids.shape == (3, 77) and (ids[1, 1:] == END).all()


def test_split_into_chunks_on_a_small_chunk_length():
    comma = 9
    stream = [(1, 1.0), (comma, 1.0), (2, 2.0), (3, 1.0), None, (4, 1.0)]
    chunks = prompts.split_into_chunks(stream, chunk_length=3, comma_id=comma, comma_backtrack=2)
    assert chunks == [[(1, 1.0), (comma, 1.0)], [(2, 2.0), (3, 1.0)], [(4, 1.0)]]
    # A comma arriving at a full chunk opens the next one and is no break point there.
    stream = [(1, 1.0)] * 3 + [(comma, 1.0)] + [(2, 1.0)] * 3
    chunks = prompts.split_into_chunks(stream, chunk_length=3, comma_id=comma, comma_backtrack=2)
    assert chunks == [[(1, 1.0)] * 3, [(comma, 1.0), (2, 1.0), (2, 1.0)], [(2, 1.0)]]
    assert prompts.split_into_chunks([], 3, comma, 2) == [[]]


def test_frame_chunk():
    ids, weights = prompts.frame_chunk([(5, 2.0), (6, 0.5)], chunk_length=4, start_id=100, end_id=101, pad_id=101)
    assert ids == [100, 5, 6, 101, 101, 101] and weights == [1.0, 2.0, 0.5, 1.0, 1.0, 1.0]
    ids, weights = prompts.frame_chunk([(5, 2.0)], chunk_length=4, start_id=100, end_id=101, pad_id=0)
    assert ids == [100, 5, 101, 0, 0, 0] and weights == [1.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    ids, _ = prompts.frame_chunk([(5, 1.0)] * 4, chunk_length=4, start_id=100, end_id=101, pad_id=0)
    assert ids == [100, 5, 5, 5, 5, 101]


def random_chunks(key, n_chunks=3, length=77, dim=16):
    z_key, w_key = jax.random.split(key)
    z = jax.random.normal(z_key, (n_chunks, length, dim), jnp.float32) + 0.5
    weights = jax.random.uniform(w_key, (n_chunks, length), jnp.float32, 0.5, 1.5)
    return z, weights


@pytest.mark.parametrize("jit", [False, True])
def test_mean_restore_with_unit_weights_is_identity(key, jit):
    z, _ = random_chunks(key)
    fn = jax.jit(prompts.weighted_mean_restore) if jit else prompts.weighted_mean_restore
    out = fn(z, jnp.ones(z.shape[:2], jnp.float32))
    assert out.dtype == z.dtype
    np.testing.assert_array_equal(np.asarray(out), np.asarray(z))
    # numpy in, and a lower precision dtype kept.
    z16 = np.asarray(z).astype(np.float16)
    out16 = fn(z16, np.ones(z.shape[:2], np.float32))
    assert out16.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(out16), z16)


@pytest.mark.parametrize("jit", [False, True])
def test_mean_restore_keeps_each_chunk_mean_and_scales_tokens(key, jit):
    z, weights = random_chunks(key)
    weights = weights.at[:, 0].set(1.0)
    fn = jax.jit(prompts.weighted_mean_restore) if jit else prompts.weighted_mean_restore
    out = np.asarray(fn(z, weights), np.float64)
    z64, w64 = np.asarray(z, np.float64), np.asarray(weights, np.float64)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), z64.mean(axis=(1, 2)), rtol=2e-6)
    # Each chunk is z * weights times one factor of its own, so weighted tokens stand out by their weight.
    factor = out / (z64 * w64[..., None])
    np.testing.assert_allclose(factor, factor[:, :1, :1] * np.ones_like(factor), rtol=1e-5)
    assert not np.allclose(factor[0, 0, 0], factor[1, 0, 0], rtol=1e-4)
    token = 5
    ratio = (out[:, token] / out[:, 0]) / (z64[:, token] / z64[:, 0])
    np.testing.assert_allclose(ratio, np.broadcast_to(w64[:, token, None], ratio.shape), rtol=1e-5)


def test_mean_restore_skips_negligible_means():
    # Zero-mean rows (a layer norm without bias) have a mean of rounding noise: no rescale, no blow-up.
    rng = np.random.default_rng(3)
    z = rng.standard_normal((1, 77, 32)).astype(np.float32)
    z -= z.mean(axis=-1, keepdims=True)
    weights = np.ones((1, 77), np.float32)
    weights[0, 3] = 1.5
    out = np.asarray(prompts.weighted_mean_restore(z, weights))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0, 3], 1.5 * z[0, 3], rtol=1e-6)
    np.testing.assert_array_equal(out[0, 4:], z[0, 4:])
