"""The CLIP tokenizer: text -> (B, 77) token ids, as Stable Diffusion's pipelines feed the text encoder.

Tokenization itself is transformers' `CLIPTokenizer` (a Rust `tokenizers` BPE); this file only finds its
vocabulary: a tokenizer folder (`vocab.json` + `merges.txt`, or `tokenizer.json`), or OpenAI's
`bpe_simple_vocab_16e6.txt.gz`, from which CLIP's 49408-token vocabulary is rebuilt.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import transformers

BPE_VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
VOCAB_SIZE = 49408
# CLIP keeps the first 49152 - 256 - 2 merges of the file, so that 2 * 256 byte tokens, the merges and the two
# special tokens make exactly 49408.
_NUM_MERGES = 49152 - 256 - 2
_TOKENIZER_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class BPEVocabNotFoundError(FileNotFoundError):
    """No CLIP BPE vocabulary could be found."""


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves, in byte order; the remaining bytes (control characters, space,
    ...) map to code points 256, 257, ... in byte order. The dict's insertion order is the vocabulary order:
    the printable bytes first, so that "!" gets id 0.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def bpe_vocab(bpe_gz_path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id) and ranked merges from `bpe_simple_vocab_16e6.txt.gz`.

    The vocabulary is the 256 byte tokens, the same with the end-of-word suffix `</w>`, one token per merge,
    then `<|startoftext|>` (49406) and `<|endoftext|>` (49407).
    """
    with gzip.open(bpe_gz_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # The first line is a version header.
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_gz_path} is not a CLIP BPE merges file (expected {_NUM_MERGES} 'a b' lines)")
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_gz_path} gives {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def bpe_vocab_files(bpe_gz_path: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Writes CLIP's `vocab.json` and `merges.txt` (the hub tokenizer layout) built from the BPE file.

    Returns:
      (vocab_json_path, merges_txt_path) inside `out_dir` (created if needed).
    """
    vocab, merges = bpe_vocab(bpe_gz_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path = out_dir / "vocab.json"
    merges_path = out_dir / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_path, merges_path


def find_bpe_vocab(bpe_path: str | Path | None = None) -> Path:
    """The CLIP BPE vocabulary file: `bpe_path` if given, else the copy inside an installed `open_clip`.

    `open_clip` is located without being imported (importing it pulls in torch and timm).

    Raises:
      BPEVocabNotFoundError: if `bpe_path` does not exist, or none is given and open_clip is not installed.
    """
    if bpe_path is not None:
        path = Path(bpe_path)
        if not path.is_file():
            raise BPEVocabNotFoundError(f"CLIP BPE vocabulary {path} does not exist")
        return path
    spec = importlib.util.find_spec("open_clip")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / BPE_VOCAB_NAME
        if path.is_file():
            return path
    raise BPEVocabNotFoundError(
        f"no CLIP tokenizer vocabulary: give a tokenizer folder, or the path of OpenAI's {BPE_VOCAB_NAME} "
        f"with --bpe_vocab=PATH, or install the package that ships it: pip install --no-deps open-clip-torch"
    )


def _has_tokenizer_config(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_CONFIG_FILES)


def load_tokenizer(
    folder: str | Path | None = None,
    *,
    bpe_path: str | Path | None = None,
    pad_token: str = END_OF_TEXT,
    model_max_length: int = 77,
) -> transformers.CLIPTokenizer:
    """A CLIP tokenizer from a tokenizer folder, or from the BPE vocabulary when `folder` is None.

    Args:
      folder: holds `vocab.json` + `merges.txt` (hub SD 1.5 / 2.1 layout) or `tokenizer.json` (transformers 5).
      bpe_path: the BPE vocabulary for `folder=None`; found with `find_bpe_vocab` if not given.
      pad_token: `<|endoftext|>` for SD 1.x, `!` (id 0) for SD 2.x. Ignored when the folder has its own
        tokenizer config, whose pad token is kept.
      model_max_length: likewise, unless the folder's config sets it.

    Raises:
      FileNotFoundError: the folder has no tokenizer files; BPEVocabNotFoundError (a FileNotFoundError) when
        `folder` is None and no BPE vocabulary can be found.
    """
    if folder is None:
        vocab, merges = bpe_vocab(find_bpe_vocab(bpe_path))
        return transformers.CLIPTokenizer(
            vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=model_max_length
        )
    folder = Path(folder)
    has_bpe_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not (has_bpe_files or (folder / "tokenizer.json").is_file()):
        raise FileNotFoundError(f"{folder} holds neither vocab.json + merges.txt nor tokenizer.json")
    overrides = {}
    if not _has_tokenizer_config(folder):
        overrides = {"pad_token": pad_token, "model_max_length": model_max_length}
    return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **overrides)


def tokenize(tokenizer: transformers.PreTrainedTokenizerBase, texts: list[str], length: int = 77) -> np.ndarray:
    """Token ids (B, length) int32: start token, text, end token, padded with the pad token and truncated to
    `length` (the end token is kept), as diffusers' StableDiffusionPipeline tokenizes prompts."""
    if isinstance(texts, str):
        raise TypeError("tokenize takes a list of strings, got one string")
    ids = tokenizer(
        list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="np"
    ).input_ids
    return np.asarray(ids, dtype=np.int32)


def save_bpe_tokenizer(out_dir: str | Path, *, bpe_path: str | Path | None = None, **kwargs) -> Path:
    """Writes a tokenizer folder built from the BPE vocabulary (`load_tokenizer` kwargs apply) and returns it."""
    out_dir = Path(out_dir)
    load_tokenizer(None, bpe_path=bpe_path, **kwargs).save_pretrained(str(out_dir))
    return out_dir
