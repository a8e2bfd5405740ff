"""Prompts through the pipeline: `encode_prompt` against transformers' CLIP on the same random weights (emphasis,
chunks, clip skip), negative/positive chunk padding, and bucketed prompt lengths (masked, no recompilation)."""

import numpy as np
import pytest
import torch

import sd_jax
from sd_jax import prompts
from tests.tiny_models import save_diffusers_pipeline, tiny_config

WORD = "cat"  # one token
LAYERS = 2  # the tiny text encoder's depth


@pytest.fixture(scope="module", params=["sd1", "sd2_v"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = save_diffusers_pipeline(tiny_config(request.param), folder)
    return reference, sd_jax.load(folder)


def reference_chunks(reference, ids: np.ndarray, clip_skip: int) -> np.ndarray:
    """transformers' embeddings of each 77-token chunk (n, 77, D): layer -clip_skip, then the final layer norm."""
    encoder = reference.text_encoder
    out = []
    with torch.no_grad():
        for chunk in ids:
            result = encoder(torch.from_numpy(chunk[None]).long(), output_hidden_states=True)
            hidden = result.hidden_states[-clip_skip]
            out.append(encoder.final_layer_norm(hidden)[0].numpy())
    return np.stack(out)


def restore_mean(z: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUTOMATIC1111's "Original" emphasis in float64 numpy, chunk by chunk."""
    z = z.astype(np.float64)
    out = []
    for chunk, w in zip(z, weights, strict=True):
        weighted = chunk * w[:, None]
        out.append(weighted * (chunk.mean() / weighted.mean()))
    return np.stack(out)


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize(
    "text",
    [
        "a photo of a cat",
        "a (photo:1.4) of a ((cat)) on [a mat], (sunset:0.7)",
        "first part BREAK second (part:1.3)",
        ", ".join(["a red house with a blue door"] * 12),  # 96 tokens: two chunks split at a comma
    ],
)
def test_encode_prompt_matches_transformers(pair, text, clip_skip):
    reference, pipe = pair
    ids, weights = prompts.tokenize_weighted(pipe.tokenizer, text)
    expected = restore_mean(reference_chunks(reference, ids, clip_skip), weights)
    ours = pipe.encode_prompt(text, clip_skip=clip_skip)
    assert ours.shape == (len(ids) * 77, pipe.config.text_encoder.hidden_size)
    # Float32 encoders: ~1e-6 relative (the tiny encoder's weights are random, its means far from zero).
    scale = np.abs(expected).max()
    err = np.abs(ours - expected.reshape(ours.shape)).max() / scale
    print(f"{text[:30]!r} clip_skip={clip_skip}: {len(ids)} chunk(s), max error / max |z| = {err:.2e}")
    assert err < 1e-5
    if (weights != 1).any():
        plain = reference_chunks(reference, ids, clip_skip).reshape(ours.shape)
        assert np.abs(ours - plain).max() / scale > 1e-2, "the weights must change the embeddings"


@pytest.mark.parametrize("tokens, chunks", [(75, 1), (76, 2), (150, 2), (151, 3)])
def test_encode_prompt_chunk_counts(pair, tokens, chunks):
    _, pipe = pair
    text = " ".join([WORD] * tokens)
    assert len(pipe.tokenizer(text, add_special_tokens=False)["input_ids"]) == tokens
    assert pipe.encode_prompt(text).shape == (chunks * 77, pipe.config.text_encoder.hidden_size)


def test_clip_skip_checked(pair):
    _, pipe = pair
    for bad in (0, LAYERS + 1, 1.5):
        with pytest.raises(ValueError, match="clip_skip"):
            pipe.encode_prompt("a cat", clip_skip=bad)


def test_negative_padded_to_the_prompts_chunks(pair):
    _, pipe = pair
    long = " ".join([WORD] * 100)
    contexts, mask = pipe.prompts.contexts([long], ["blurry"], 1)
    assert contexts.shape[:3] == (1, 2, 154) and mask.all()
    # The negative's second chunk is the empty prompt's chunk, as AUTOMATIC1111 pads.
    np.testing.assert_array_equal(contexts[0, 0, 77:], pipe.encode_prompt("").astype(contexts.dtype))
    np.testing.assert_array_equal(contexts[0, 0, :77], pipe.encode_prompt("blurry").astype(contexts.dtype))


def test_bucketed_lengths_do_not_recompile_or_change_images(pair):
    _, pipe = pair
    if pipe.config.pad_token != tiny_config("sd1").pad_token:
        pytest.skip("the masking is topology-independent; one model keeps the compile time down")
    kwargs = dict(height=32, width=32, steps=2, seed=4)
    three = " ".join([WORD] * 200)  # 3 chunks: bucket of 4
    four = " ".join([WORD] * 290)  # 4 chunks: the same bucket
    pipe.txt2img(three, **kwargs)
    compiled = pipe.program.compiled_count()
    pipe.txt2img(four, **kwargs)
    assert pipe.program.compiled_count() == compiled
    # A 1-chunk prompt padded into a batch's bucket of 2 gives the image it gives alone (masked tokens get exactly
    # zero attention weight), up to float rounding: the softmax and value sums run over 154 keys instead of 77.
    long = " ".join([WORD] * 100)
    batch = pipe.txt2img(["a dog", long], **kwargs)
    alone = pipe.txt2img("a dog", **kwargs)
    diff = np.abs(np.asarray(batch[0]).astype(int) - np.asarray(alone[0]).astype(int))
    print(f"bucket 2 vs alone: max {diff.max()} / 255, {np.mean(diff > 0):.2%} of values differ")
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.01
