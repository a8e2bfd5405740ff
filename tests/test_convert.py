"""The converter: diffusers folders and original single files to converted folders, and its errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import sd_jax
from sd_jax.convert.convert import convert
from sd_jax.convert.params import state_to_flat
from sd_jax.loading import load_components
from tests.single_file_writer import write_original_single_file
from tests.tiny_models import save_diffusers_pipeline, tiny_config

ROOT = Path(__file__).resolve().parents[1]
# What a single file cannot tell about the tiny models (real SD files use the standard head counts).
TINY_HEADS = {"unet": {"attention_head_dim": 2}, "text_encoder": {"num_attention_heads": 2}}


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers") / "tiny"
    reference = save_diffusers_pipeline(tiny_config("sd1"), folder)
    return folder, reference


def _flat(states):
    return {name: state_to_flat(state) for name, state in states.items()}


def _assert_same_params(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            np.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name}.{key}")


def run_script(*args, cwd=None, env=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)} | (env or {})
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd or ROOT, timeout=600
    )


def test_diffusers_folder_converts_to_identical_params(diffusers_folder, tmp_path):
    folder, reference = diffusers_folder
    out = convert(folder, tmp_path / "converted")
    config_a, states_a, _ = load_components(folder)
    config_b, states_b, tokenizer = load_components(out)
    assert config_a == config_b
    _assert_same_params(_flat(states_a), _flat(states_b))
    # The converted U-Net holds exactly the PyTorch weights, transposed to NHWC kernels.
    torch_conv = reference.unet.state_dict()["conv_in.weight"].numpy()
    np.testing.assert_array_equal(_flat(states_b)["unet"]["conv_in.kernel"], torch_conv.transpose(2, 3, 1, 0))
    assert tokenizer("a photo of a cat").input_ids == reference.tokenizer("a photo of a cat").input_ids
    # And the two load paths generate the same pixels.
    kwargs = dict(height=32, width=32, steps=2, seed=5)
    a = np.asarray(sd_jax.load(folder).txt2img("a cat", **kwargs)[0])
    b = np.asarray(sd_jax.load(out).txt2img("a cat", **kwargs)[0])
    np.testing.assert_array_equal(a, b)


def test_bfloat16_conversion(diffusers_folder, tmp_path):
    folder, _ = diffusers_folder
    out = convert(folder, tmp_path / "bf16", dtype="bfloat16")
    _, states, _ = load_components(out, "bfloat16")
    _, states32, _ = load_components(folder)
    flat, flat32 = _flat(states), _flat(states32)
    kernel = flat["unet"]["conv_in.kernel"]
    assert str(kernel.dtype) == "bfloat16"
    np.testing.assert_allclose(kernel.astype(np.float32), flat32["unet"]["conv_in.kernel"], rtol=2**-8, atol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_converts_to_identical_params(diffusers_folder, tmp_path, suffix):
    folder, reference = diffusers_folder
    path = tmp_path / f"model{suffix}"
    write_original_single_file(
        reference.unet.state_dict(), reference.vae.state_dict(), reference.text_encoder.state_dict(), "sd1", path
    )
    config_a, states_a, _ = load_components(folder)
    config_b, states_b, _ = load_components(path, overrides=TINY_HEADS)
    assert config_b.unet.heads == config_a.unet.heads
    assert config_b.text_encoder.num_attention_heads == config_a.text_encoder.num_attention_heads
    _assert_same_params(_flat(states_a), _flat(states_b))


def test_convert_script_end_to_end(diffusers_folder, tmp_path):
    folder, _ = diffusers_folder
    out = tmp_path / "converted"
    result = run_script("scripts/convert.py", f"--checkpoint={folder}", f"--output={out}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(str(out))
    assert sd_jax.checkpoint.is_converted(out)
    # An existing output is never overwritten.
    again = run_script("scripts/convert.py", f"--checkpoint={folder}", f"--output={out}")
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert "Traceback" not in again.stderr


def _error_line(result):
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_truncated_file_is_a_clear_error(diffusers_folder, tmp_path):
    _, reference = diffusers_folder
    path = tmp_path / "model.safetensors"
    write_original_single_file(
        reference.unet.state_dict(), reference.vae.state_dict(), reference.text_encoder.state_dict(), "sd1", path
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    result = run_script("scripts/convert.py", f"--checkpoint={path}", f"--output={tmp_path / 'out'}")
    assert "model.safetensors" in _error_line(result)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no partial output left behind"


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "payload": _RunsCode(marker)}, path)
    result = run_script("scripts/convert.py", f"--checkpoint={path}", f"--output={tmp_path / 'out'}")
    line = _error_line(result)
    assert "refusing" in line
    assert not marker.exists()
    with pytest.raises(sd_jax.convert.torch_files.CheckpointError):
        load_components(path)
    assert not marker.exists()


def test_missing_and_unexpected_keys_are_listed(diffusers_folder, tmp_path):
    folder, _ = diffusers_folder
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    del tensors["conv_in.bias"]
    tensors["extra.weight"] = torch.zeros(3)
    safetensors.torch.save_file(tensors, weights)
    result = run_script("scripts/convert.py", f"--checkpoint={broken}", f"--output={tmp_path / 'out'}")
    line = _error_line(result)
    assert "missing keys (1): conv_in.bias" in line
    assert "unexpected keys (1): extra.weight" in line


def test_wrong_architecture_is_a_shape_error(diffusers_folder, tmp_path):
    folder, _ = diffusers_folder

    broken = tmp_path / "wrong"
    shutil.copytree(folder, broken)
    config_file = broken / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["cross_attention_dim"] = 48
    config_file.write_text(json.dumps(config))
    with pytest.raises(sd_jax.convert.params.ConversionError, match="shape mismatches"):
        load_components(broken)


def test_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    for path, message in [
        (tmp_path / "nothing.safetensors", "no such file"),
        (tmp_path / "empty", "neither a converted"),
    ]:
        with pytest.raises(sd_jax.LoadError, match=message):
            load_components(path)
