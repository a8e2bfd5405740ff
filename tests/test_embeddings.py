"""Textual-inversion embeddings: the file formats, the folder, prompts that name them (emphasis, chunk boundaries),
and parity with diffusers' `load_textual_inversion` on the same random weights, text embeddings and images."""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

import sd_jax
from sd_jax import parallel, prompts
from sd_jax.conditioning import PromptEncoder, table_bucket
from sd_jax.convert.torch_files import write_safetensors
from sd_jax.embeddings import EmbeddingError, EmbeddingLibrary, read_embedding, short_hash
from sd_jax.models import abstract_components
from tests.tiny_models import save_diffusers_pipeline, tiny_config

# Names the CLIP vocabulary spells with several tokens (diffusers refuses a name that is one of its tokens).
PT_NAME, PT_VECTORS = "lumafox", 3  # AUTOMATIC1111's .pt
ST_NAME, ST_VECTORS = "velvetnight", 2  # .safetensors with emb_params
PROMPTS = [f"a photo of {PT_NAME}", f"a red house, {ST_NAME}"]
NEGATIVES = [ST_NAME, f"blurry {PT_NAME}"]
# Embedding vectors are drawn 4x the tiny encoder's token scale (0.5), so they clearly change the images.
SCALE = 2.0


def random_vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return SCALE * torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def save_a1111_pt(path, vectors: torch.Tensor) -> None:
    """What AUTOMATIC1111's `Embedding.save` writes (a trained vector keeps requires_grad)."""
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vectors.clone().requires_grad_(True)},
        "name": path.stem,
        "step": 500,
        "sd_checkpoint": "0123456789",
        "sd_checkpoint_name": "tiny",
    }
    torch.save(data, path)


def save_emb_params(path, vectors: torch.Tensor) -> None:
    safetensors.torch.save_file({"emb_params": vectors.contiguous()}, str(path))


@pytest.fixture(scope="module", params=["sd1", "sd2_v"])
def pair(request, tmp_path_factory):
    """(kind, diffusers pipeline with both embeddings loaded, sd_jax pipeline with the embeddings folder)."""
    folder = tmp_path_factory.mktemp(request.param)
    config = tiny_config(request.param)
    reference = save_diffusers_pipeline(config, folder / "model")
    pipe = sd_jax.load(folder / "model", mesh=parallel.batch_mesh(jax.devices()[:1]))  # no padding images
    width = config.text_encoder.hidden_size
    (folder / "embeddings").mkdir()
    pt_path = folder / "embeddings" / f"{PT_NAME}.pt"
    st_path = folder / "embeddings" / f"{ST_NAME}.safetensors"
    save_a1111_pt(pt_path, random_vectors(PT_VECTORS, width, 1))
    save_emb_params(st_path, random_vectors(ST_VECTORS, width, 2))
    pipe.prompts.embeddings = EmbeddingLibrary(folder / "embeddings")
    # diffusers reads both files itself: the A1111 dict (string_to_param) and the one-tensor safetensors.
    reference.load_textual_inversion(str(pt_path), token=PT_NAME)
    reference.load_textual_inversion(str(st_path), token=ST_NAME)
    return request.param, reference, pipe


@pytest.fixture
def sd1(pair):
    kind, _, pipe = pair
    if kind != "sd1":
        pytest.skip("prompt handling does not depend on the topology; one model keeps the time down")
    return pipe


def fresh_encoder(pipe, folder=None) -> PromptEncoder:
    """A PromptEncoder of the pipeline's text encoder with a compilation cache of its own."""
    graph = abstract_components(pipe.config, jnp.float32)["text_encoder"][0]
    encoder = PromptEncoder(graph, pipe.states["text_encoder"], pipe.tokenizer, pipe.config.text_encoder, jnp.float32)
    encoder.embeddings = None if folder is None else EmbeddingLibrary(folder)
    return encoder


# -- files ----------------------------------------------------------------------------------------------------------
def test_reads_every_format(tmp_path):
    vectors = random_vectors(4, 16, 0)
    save_a1111_pt(tmp_path / "a.pt", vectors)
    save_emb_params(tmp_path / "b.safetensors", vectors)
    torch.save({"<my-token>": vectors[0]}, tmp_path / "learned_embeds.bin")  # diffusers, one vector
    safetensors.torch.save_file({"<my-token>": vectors}, str(tmp_path / "learned_embeds.safetensors"))
    safetensors.torch.save_file({"emb_params": vectors.bfloat16()}, str(tmp_path / "half.safetensors"))
    old = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)})  # the original textual-inversion code's
    torch.save({"string_to_token": {"*": 265}, "string_to_param": old}, tmp_path / "old.pt")
    for name in ("a.pt", "b.safetensors", "learned_embeds.safetensors", "old.pt"):
        got = read_embedding(tmp_path / name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, vectors.numpy())
    np.testing.assert_array_equal(read_embedding(tmp_path / "learned_embeds.bin"), vectors[:1].numpy())
    np.testing.assert_array_equal(read_embedding(tmp_path / "half.safetensors"), vectors.bfloat16().float().numpy())


def test_bad_files_are_one_line_errors(tmp_path):
    vectors = random_vectors(2, 8, 0)
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle at all")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    torch.save({"string_to_param": {}}, tmp_path / "empty.pt")
    write_safetensors(tmp_path / "none.safetensors", {})
    torch.save({"a": vectors, "b": vectors}, tmp_path / "two.bin")
    safetensors.torch.save_file({"clip_l": vectors, "clip_g": vectors.clone()}, str(tmp_path / "sdxl.safetensors"))
    torch.save({"emb_params": torch.zeros(0, 8)}, tmp_path / "zero.bin")
    torch.save({"emb_params": torch.full((1, 8), float("nan"))}, tmp_path / "nan.bin")
    cases = {
        "garbage.pt": "not a readable PyTorch file",
        "garbage.safetensors": "not a readable .safetensors file",
        "empty.pt": "expected one tensor in 'string_to_param', found 0",
        "none.safetensors": "no vectors",
        "two.bin": "2 tensors",
        "sdxl.safetensors": "SDXL",
        "zero.bin": "shape",
        "nan.bin": "NaN",
        "missing.pt": "no such file",
    }
    for name, message in cases.items():
        with pytest.raises(EmbeddingError, match=message) as error:
            read_embedding(tmp_path / name)
        assert str(error.value).startswith(str(tmp_path / name)) and "\n" not in str(error.value)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"string_to_param": {"*": _RunsCode(marker)}}, tmp_path / "evil.pt")
    with open(tmp_path / "evil_plain.bin", "wb") as f:  # a bare pickle, not torch's zip format
        pickle.dump({"emb": _RunsCode(marker)}, f, protocol=2)
    with pytest.raises(EmbeddingError, match="refusing to load: the pickle names posix.system"):
        read_embedding(tmp_path / "evil.pt")
    with pytest.raises(EmbeddingError, match="refusing to load"):
        read_embedding(tmp_path / "evil_plain.bin")
    assert not marker.exists()


def test_short_hash_is_the_files_sha256_prefix(tmp_path):
    (tmp_path / "abc.pt").write_bytes(b"abc")
    assert short_hash(tmp_path / "abc.pt") == "ba7816bf8f01"  # sha256("abc") = ba7816bf8f01cfea...


def test_library_lists_names_like_the_web_ui(tmp_path):
    vectors = random_vectors(1, 8, 0)
    save_emb_params(tmp_path / "top.safetensors", vectors)
    (tmp_path / "sub").mkdir()
    save_a1111_pt(tmp_path / "sub" / "nested.pt", vectors)
    save_a1111_pt(tmp_path / "sub" / "top.pt", vectors)  # the name is taken nearer the top
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / ".hidden.pt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    library = EmbeddingLibrary(tmp_path)
    assert library.files() == {"nested": tmp_path / "sub" / "nested.pt", "top": tmp_path / "top.safetensors"}
    version = library.version
    save_emb_params(tmp_path / "late.safetensors", vectors)
    assert "late" in library.files() and library.version == version + 1
    with pytest.raises(EmbeddingError, match="no such embeddings folder"):
        EmbeddingLibrary(tmp_path / "nope")


# -- prompts --------------------------------------------------------------------------------------------------------
def test_split_keeps_an_embedding_whole():
    comma = 9
    stream = [(1, 1.0), (2, 1.0), [(100, 1.0), (101, 1.0)], (3, 1.0)]
    assert prompts.split_into_chunks(stream, 3, comma, 0) == [[(1, 1.0), (2, 1.0)], [(100, 1.0), (101, 1.0), (3, 1.0)]]
    # A full chunk still backtracks to its comma when the next item is an embedding, which then joins the words
    # that moved; one that does not fit after them closes that chunk too.
    stream = [(1, 1.0), (comma, 1.0), (2, 1.0), [(100, 1.0), (101, 1.0)]]
    assert prompts.split_into_chunks(stream, 3, comma, 2) == [
        [(1, 1.0), (comma, 1.0)],
        [(2, 1.0), (100, 1.0), (101, 1.0)],
    ]
    stream = [(1, 1.0), (comma, 1.0), (2, 1.0), [(100, 1.0), (101, 1.0), (102, 1.0)]]
    assert prompts.split_into_chunks(stream, 3, comma, 2) == [[(1, 1.0), (comma, 1.0)], [(2, 1.0)], stream[-1]]
    with pytest.raises(ValueError, match="does not fit a chunk of 3 tokens"):
        prompts.split_into_chunks([[(100, 1.0)] * 4], 3, comma, 2)


def test_names_are_found_in_token_pieces(sd1):
    vocab = sd1.prompts.vocab_size
    ids, weights = sd1.prompts.tokenize(f"{PT_NAME}, ({ST_NAME}:1.3) {PT_NAME}")
    pt = list(range(vocab, vocab + PT_VECTORS))
    st = list(range(vocab + PT_VECTORS, vocab + PT_VECTORS + ST_VECTORS))
    assert list(ids[0, :11]) == [49406, *pt, 267, *st, *pt, 49407]
    np.testing.assert_allclose(weights[0, :11], [1, 1, 1, 1, 1, 1.3, 1.3, 1, 1, 1, 1])
    # A name split by emphasis brackets is plain text, as in the web UI.
    ids, _ = sd1.prompts.tokenize("luma(fox)")
    assert ids.max() < vocab


def test_emphasis_weights_an_embedding_like_a_token(sd1):
    plain = sd1.encode_prompt(f"a {PT_NAME} cat").reshape(1, 77, -1)
    weighted = sd1.encode_prompt(f"a ({PT_NAME}:1.3) cat").reshape(1, 77, -1)
    weights = np.ones((1, 77), np.float32)
    weights[0, 2 : 2 + PT_VECTORS] = 1.3
    expected = np.asarray(prompts.weighted_mean_restore(plain, weights))
    np.testing.assert_allclose(weighted, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(weighted - plain).max() > 1e-2


@pytest.mark.parametrize("cats, chunks", [(72, 1), (73, 2)])
def test_an_embedding_never_straddles_chunks(sd1, cats, chunks):
    text = " ".join(["cat"] * cats) + f" {PT_NAME}"
    ids, _ = sd1.prompts.tokenize(text)
    assert len(ids) == chunks
    extra = np.argwhere(ids >= sd1.prompts.vocab_size)
    assert len(extra) == PT_VECTORS and len(set(extra[:, 0])) == 1
    if chunks == 2:
        # Moved whole to the next chunk: that chunk is the name alone, the first one ends after the cats.
        np.testing.assert_array_equal(ids[1], sd1.prompts.tokenize(PT_NAME)[0][0])
        assert (ids[0, 1 + cats :] == 49407).all()
        z = sd1.encode_prompt(text)
        np.testing.assert_allclose(z[77:], sd1.encode_prompt(PT_NAME), rtol=1e-6, atol=1e-6)


def test_wrong_width_is_an_error_when_named(sd1, tmp_path):
    save_a1111_pt(tmp_path / "widevec.pt", random_vectors(2, 64, 0))  # an SD 2.x-width embedding, for a 32-wide encoder
    encoder = fresh_encoder(sd1, tmp_path)
    with pytest.raises(EmbeddingError, match="width 64 do not fit this model's text encoder") as error:
        encoder.chunks("a widevec", 1)
    assert str(tmp_path / "widevec.pt") in str(error.value) and "\n" not in str(error.value)
    encoder.chunks("a cat", 1)  # a prompt that does not name it is fine
    library, sd1.prompts.embeddings = sd1.prompts.embeddings, EmbeddingLibrary(tmp_path)
    try:
        with pytest.raises(EmbeddingError):  # before anything is sampled
            sd1.txt2img("a widevec", steps=1, height=32, width=32)
    finally:
        sd1.prompts.embeddings = library


def test_new_files_and_values_need_no_recompilation(sd1, tmp_path):
    width = sd1.config.text_encoder.hidden_size
    save_a1111_pt(tmp_path / "alpha.pt", random_vectors(3, width, 10))
    encoder, bare = fresh_encoder(sd1, tmp_path), fresh_encoder(sd1)
    # Without a name in the prompt, a library changes nothing: same ids, same program, same numbers.
    np.testing.assert_array_equal(encoder.tokenize("a cat")[0], bare.tokenize("a cat")[0])
    np.testing.assert_array_equal(np.asarray(encoder.chunks("a cat", 1)), np.asarray(bare.chunks("a cat", 1)))
    before = np.asarray(encoder.chunks("a beta", 1))
    alpha = np.asarray(encoder.chunks("a alpha", 1))
    compiled = encoder.compiled_count()
    assert table_bucket(3) == table_bucket(5) == 16
    save_emb_params(tmp_path / "beta.safetensors", random_vectors(5, width, 11))  # added later: found next prompt
    after = np.asarray(encoder.chunks("a beta", 1))
    assert np.abs(after - before).max() > 1e-2
    save_a1111_pt(tmp_path / "alpha.pt", random_vectors(4, width, 12))  # rewritten: the cache must not serve the old
    assert np.abs(np.asarray(encoder.chunks("a alpha", 1)) - alpha).max() > 1e-2
    assert encoder.compiled_count() == compiled
    assert encoder.used_embeddings(["a beta", "alpha, beta", "cat"]) == {
        "beta": tmp_path / "beta.safetensors",
        "alpha": tmp_path / "alpha.pt",
    }


# -- against diffusers ----------------------------------------------------------------------------------------------
def test_text_embeddings_match_diffusers(pair):
    kind, reference, pipe = pair
    for prompt, negative in zip(PROMPTS, NEGATIVES, strict=True):
        with torch.no_grad():
            expected = reference.encode_prompt(prompt, "cpu", 1, True, negative)
        for text, want in ((prompt, expected[0]), (negative, expected[1])):
            want = want[0].numpy()
            err = np.abs(pipe.encode_prompt(text) - want).max() / np.abs(want).max()
            print(f"{kind} {text!r}: max error / max |z| = {err:.1e}")
            assert err < 1e-5
    assert pipe.prompts.used_embeddings(PROMPTS + NEGATIVES).keys() == {PT_NAME, ST_NAME}


def test_images_match_diffusers(pair):
    """One image per call, the program tests/test_lora.py compiles too (32x32, one image, one device): the
    compilation cache serves whichever file runs second."""
    kind, reference, pipe = pair
    kwargs = dict(height=32, width=32, guidance_scale=7.5)
    for i, (prompt, negative) in enumerate(zip(PROMPTS, NEGATIVES, strict=True)):
        latents = np.random.default_rng(i).standard_normal((1, 4, 4, 4)).astype(np.float32)
        run = dict(negative_prompt=negative, latents=latents, **kwargs)
        with torch.no_grad():
            expected = reference(
                prompt, num_inference_steps=3, output_type="np", **{**run, "latents": torch.from_numpy(latents)}
            ).images[0]
        expected = (expected * 255).round().astype(int)
        ours = np.asarray(pipe.txt2img(prompt, steps=3, **run)[0]).astype(int)
        library, pipe.prompts.embeddings = pipe.prompts.embeddings, None
        try:
            plain = np.asarray(pipe.txt2img(prompt, steps=3, **run)[0]).astype(int)
        finally:
            pipe.prompts.embeddings = library
        diff = np.abs(ours - expected)
        change = np.abs(ours - plain).mean()
        print(f"{kind} {prompt!r}: max abs pixel difference {diff.max()} / 255; the embeddings move pixels by {change}")
        assert diff.max() <= 2
        assert change > 5, "the embeddings must change the image clearly"
