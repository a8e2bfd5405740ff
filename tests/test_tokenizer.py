"""The CLIP tokenizer layer: vocabulary built from OpenAI's BPE file, folder layouts, padding, errors."""

import gzip
import importlib.util
import json

import numpy as np
import pytest
import regex

from sd_jax import tokenizer as tk

BPE = tk.find_bpe_vocab() if importlib.util.find_spec("open_clip") else None
needs_bpe = pytest.mark.skipif(BPE is None, reason="needs open-clip-torch's bpe_simple_vocab_16e6.txt.gz")

# Real CLIP ids (OpenAI CLIP / open_clip / the hub SD tokenizers): <|startoftext|> a photo of a cat <|endoftext|>.
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]

PROMPTS = [
    "a photo of a cat",
    "A  Photograph of an ASTRONAUT riding a horse, trending on artstation, 4k!!",
    "it's a dog's life; they're here (1999) -- café, naïve, 東京",
    "masterpiece, best quality, ((sharp focus)), [blurry:0.5]",
    "",
]


@pytest.fixture(scope="module")
def vocab_and_merges():
    return tk.bpe_vocab(BPE)


@pytest.fixture(scope="module")
def sd1_tokenizer():
    return tk.load_tokenizer(bpe_path=BPE)


def reference_bpe_ids(text: str, vocab: dict, merges: list) -> list[int]:
    """OpenAI CLIP's simple tokenizer algorithm (without its ftfy / html clean-up), written out for comparison."""
    byte_encoder = tk.bytes_to_unicode()
    ranks = {m: i for i, m in enumerate(merges)}
    pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    text = " ".join(text.split()).strip().lower()
    ids = [vocab["<|startoftext|>"]]
    for token in pattern.findall(text):
        word = [byte_encoder[b] for b in token.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(vocab[w] for w in word)
    return ids + [vocab["<|endoftext|>"]]


@needs_bpe
def test_vocab_from_bpe_file(vocab_and_merges, tmp_path):
    vocab, merges = vocab_and_merges
    assert len(vocab) == 49408
    assert len(merges) == 49152 - 256 - 2
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a"] == 64 and vocab["a</w>"] == 256 + 64
    assert sorted(vocab.values()) == list(range(49408))

    vocab_path, merges_path = tk.bpe_vocab_files(BPE, tmp_path / "tok")
    assert json.loads(vocab_path.read_text(encoding="utf-8")) == vocab
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    assert [tuple(line.split(" ")) for line in lines[1:]] == merges


@needs_bpe
def test_known_ids(sd1_tokenizer):
    ids = tk.tokenize(sd1_tokenizer, ["a photo of a cat"])
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    assert ids[0, :7].tolist() == CAT_IDS
    assert (ids[0, 7:] == 49407).all()  # SD 1.x pads with the end token


@needs_bpe
def test_matches_reference_bpe(sd1_tokenizer, vocab_and_merges):
    vocab, merges = vocab_and_merges
    for text in PROMPTS:
        ours = sd1_tokenizer(text).input_ids
        assert ours == reference_bpe_ids(text, vocab, merges), text


@needs_bpe
def test_pad_with_exclamation_mark_for_sd2():
    tok = tk.load_tokenizer(bpe_path=BPE, pad_token="!")
    ids = tk.tokenize(tok, ["a photo of a cat", "a"])
    assert ids[0, :7].tolist() == CAT_IDS
    assert (ids[0, 7:] == 0).all()
    assert ids[1, :3].tolist() == [49406, 320, 49407] and (ids[1, 3:] == 0).all()


@needs_bpe
def test_truncation_keeps_end_token(sd1_tokenizer):
    ids = tk.tokenize(sd1_tokenizer, ["cat " * 100, "a photo of a cat"], length=10)
    assert ids.shape == (2, 10)
    assert ids[0].tolist() == [49406] + [2368] * 8 + [49407]
    assert ids[1].tolist() == CAT_IDS + [49407] * 3
    with pytest.raises(TypeError):
        tk.tokenize(sd1_tokenizer, "a photo of a cat")


@needs_bpe
def test_folder_with_vocab_and_merges(tmp_path):
    tk.bpe_vocab_files(BPE, tmp_path)
    tok = tk.load_tokenizer(tmp_path)
    assert tk.tokenize(tok, ["a photo of a cat"])[0, :8].tolist() == CAT_IDS + [49407]
    tok = tk.load_tokenizer(tmp_path, pad_token="!")
    assert tk.tokenize(tok, ["a photo of a cat"])[0, :8].tolist() == CAT_IDS + [0]


@needs_bpe
def test_folder_with_tokenizer_json_keeps_its_pad_token(tmp_path):
    tk.load_tokenizer(bpe_path=BPE, pad_token="!").save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "vocab.json").exists()
    tok = tk.load_tokenizer(tmp_path)  # default pad token is the end token, but the folder says "!"
    assert tok.pad_token == "!" and tok.model_max_length == 77
    ids = tk.tokenize(tok, ["a photo of a cat"])
    assert ids[0, :8].tolist() == CAT_IDS + [0]


@needs_bpe
def test_hub_style_folder_config_kept(tmp_path):
    """A hub SD 2.1 tokenizer folder: vocab.json + merges.txt + a tokenizer_config.json with pad "!"."""
    tk.bpe_vocab_files(BPE, tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "pad_token": "!", "model_max_length": 77})
    )
    tok = tk.load_tokenizer(tmp_path)
    assert tok.pad_token_id == 0
    assert tk.tokenize(tok, ["a photo of a cat"])[0, 7] == 0


def test_missing_vocabulary_errors(tmp_path, monkeypatch):
    with pytest.raises(tk.BPEVocabNotFoundError, match="does not exist"):
        tk.find_bpe_vocab(tmp_path / "nope.txt.gz")
    monkeypatch.setattr(tk.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"--bpe_vocab=PATH.*pip install --no-deps open-clip-torch"):
        tk.load_tokenizer()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        tk.load_tokenizer(tmp_path)


def test_rejects_a_file_that_is_not_clip_bpe(tmp_path):
    path = tmp_path / "bad.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write("#version\na b\n")
    with pytest.raises(ValueError, match="not a CLIP BPE"):
        tk.bpe_vocab(path)


def test_bytes_to_unicode():
    table = tk.bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert list(table)[:3] == [ord("!"), ord('"'), ord("#")]
    assert table[ord(" ")] == chr(256 + 32)  # space is the 33rd non-printable byte
