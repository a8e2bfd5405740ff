"""The default model: `load()` with no path reads the shipped shapes64 folder, `random:NAME` gives a preset with
random weights, and images default to the model's native size (library and scripts)."""

import json
import types

import jax
import jax.numpy as jnp
import pytest
from PIL import Image

import sd_jax
from sd_jax import loading
from sd_jax.config import PRESETS, ModelConfig, preset
from sd_jax.loading import DEFAULT_MODEL, LoadError, load_components
from sd_jax.pipeline import StableDiffusionPipeline
from tests.test_convert import run_script


def test_no_path_loads_the_shipped_shapes64_folder():
    stored = ModelConfig.from_dict(json.loads((DEFAULT_MODEL / "config.json").read_text()))
    assert json.loads((DEFAULT_MODEL / "model_index.json").read_text())["dtype"] == "float16"
    for dtype in ("float32", "bfloat16"):
        config, states, tokenizer = load_components(None, dtype)
        assert config == stored
        assert config.name == "shapes64" and config.unet == preset("shapes64").unet
        assert {leaf.dtype for leaf in jax.tree.leaves(states)} == {jnp.dtype(dtype)}
    assert str(tokenizer.pad_token) == config.pad_token


def test_missing_default_model_is_a_load_error(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "DEFAULT_MODEL", tmp_path / "shapes64")
    with pytest.raises(LoadError, match="default model is missing") as info:
        load_components(None)
    assert "\n" not in str(info.value)


def test_random_presets_by_name():
    config, states, _ = load_components("random:tiny")
    assert config == preset("tiny")
    assert set(states) == {"text_encoder", "unet", "vae"}
    with pytest.raises(LoadError) as info:
        load_components("random:nope")
    message = str(info.value)
    assert "\n" not in message and message.startswith("random:nope: no such preset")
    assert all(f"random:{name}" in message for name in PRESETS)


@pytest.mark.parametrize("name, size", [("sd15", 512), ("sd21_base", 512), ("sd21_768_v", 768), ("shapes64", 64)])
def test_native_size_follows_the_unet_sample_size(name, size):
    # The properties need only the config; no weights are built for the big presets.
    pipe = types.SimpleNamespace(config=preset(name))
    pipe.latent_factor = StableDiffusionPipeline.latent_factor.fget(pipe)
    assert StableDiffusionPipeline.native_size.fget(pipe) == size


def test_txt2img_defaults_to_the_native_size():
    pipe = sd_jax.load("random:tiny")
    assert pipe.source is None and pipe.config.unet.sample_size == 8 and pipe.native_size == 64
    (image,) = pipe.txt2img("a cat", steps=1)
    assert image.size == (64, 64)
    (image,) = pipe.txt2img("a cat", steps=1, width=32)  # a side not given is the native one
    assert image.size == (32, 64)


def test_load_without_path_names_the_asset_as_its_source():
    pipe = sd_jax.load()
    assert pipe.source == str(DEFAULT_MODEL) and pipe.native_size == 64


def test_script_default_model_and_native_size(tmp_path):
    result = run_script(
        "scripts/txt2img.py", "--prompt=a red circle on a blue background", "--steps=1", f"--output_dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr
    assert "using the default shapes model" in result.stderr
    (path,) = result.stdout.split()
    image = Image.open(path)
    assert image.size == (64, 64)
    assert "Size: 64x64, Model hash: " in image.text["parameters"]
    assert "Model: shapes64" in image.text["parameters"]
    settings = json.loads(image.text["sd_jax"])
    assert settings["model"] is None and (settings["width"], settings["height"]) == (64, 64)


def test_script_unknown_random_preset_is_one_line(tmp_path):
    result = run_script("scripts/txt2img.py", "--prompt=x", "--model=random:nope", f"--output_dir={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: random:nope: no such preset"), result.stderr
    assert list(tmp_path.iterdir()) == []
