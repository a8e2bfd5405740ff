"""The model family (SD 1 / SD 2): set by the presets and the readers, stored in a converted folder's config, and
choosing the watermark payload when generated images are saved."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from sd_jax import checkpoint
from sd_jax.config import PAD_TOKENS, SD1_PAD_TOKEN, SD2_PAD_TOKEN, ModelConfig, preset
from sd_jax.images import save_generated
from sd_jax.loading import load_components
from sd_jax.tokenizer import load_tokenizer
from sd_jax.watermark import PAYLOAD_SD1, PAYLOAD_SD2, read_watermark
from tests.test_watermark import needs_imwatermark


@pytest.mark.parametrize(
    "name, family",
    [
        ("sd15", "sd1"),
        ("sd15_inpainting", "sd1"),
        ("sd21_base", "sd2"),
        ("sd21_768_v", "sd2"),
        ("shapes64", "sd1"),
        ("tiny", "sd1"),
    ],
)
def test_presets_name_their_family_and_its_pad_token(name, family):
    config = preset(name)
    assert config.family == family
    assert config.pad_token == PAD_TOKENS[family]


def test_config_dict_round_trip_and_old_dicts_without_a_family():
    sd2 = dataclasses.replace(preset("tiny"), family="sd2", pad_token=SD2_PAD_TOKEN)
    assert sd2.to_dict()["family"] == "sd2"
    assert ModelConfig.from_dict(sd2.to_dict()) == sd2
    old = {k: v for k, v in sd2.to_dict().items() if k != "family"}
    assert ModelConfig.from_dict(old).family == "sd2"
    old["pad_token"] = SD1_PAD_TOKEN
    assert ModelConfig.from_dict(old).family == "sd1"
    with pytest.raises(ValueError, match="model family must be one of sd1, sd2, got 'sd3'"):
        dataclasses.replace(sd2, family="sd3")


def test_converted_folder_without_a_family_loads_with_the_pad_tokens(tmp_path):
    config, states, _ = load_components("random:tiny")
    config = dataclasses.replace(config, family="sd2", pad_token=SD2_PAD_TOKEN)
    folder = checkpoint.save_converted(tmp_path / "m", config, states, load_tokenizer(None, pad_token=SD2_PAD_TOKEN))
    assert load_components(folder)[0] == config
    stored = json.loads((folder / "config.json").read_text())
    del stored["family"]
    (folder / "config.json").write_text(json.dumps(stored))
    assert load_components(folder)[0] == config


def _noise(size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


@needs_imwatermark
@pytest.mark.parametrize("family, payload", [("sd1", PAYLOAD_SD1), ("sd2", PAYLOAD_SD2)])
def test_save_generated_marks_with_the_familys_payload(tmp_path, family, payload):
    notes = []
    texts = [{"parameters": "a cat"}]
    (path,) = save_generated([_noise(512)], tmp_path, [7], texts, family=family, log=notes.append)
    assert path.name == "00000-7.png" and notes == []
    with Image.open(path) as saved:
        assert read_watermark(saved, len(payload)) == payload
        assert saved.text == {"parameters": "a cat"}


def test_save_generated_unmarked_small_and_unknown_family(tmp_path):
    image = _noise(256)
    (path,) = save_generated([image], tmp_path, [0], family="sd1", watermark=False)
    with Image.open(path) as saved:
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(image))
    notes = []
    small = _noise(64)
    (path,) = save_generated([small], tmp_path, [1], family="sd2", log=notes.append)
    assert notes == ["note: images under 256 pixels a side carry no watermark"]
    with Image.open(path) as saved:
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(small))
    with pytest.raises(ValueError, match="model family must be one of sd1, sd2"):
        save_generated([image], tmp_path, [2], family="sdxl")
