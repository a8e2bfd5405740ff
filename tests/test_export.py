"""Export to diffusers folders and original single files: diffusers loads them and computes what sd_jax computes,
and loading an export gives back the exported parameters bit for bit."""

import dataclasses
import json

import diffusers
import huggingface_hub.constants
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

from sd_jax.cli import run_or_exit
from sd_jax.convert import export
from sd_jax.convert.params import state_to_flat, state_to_torch
from sd_jax.convert.single_file import split_original
from sd_jax.convert.torch_files import read_state_dict
from sd_jax.loading import load_components
from sd_jax.models import COMPONENTS, abstract_components
from sd_jax.tokenizer import load_tokenizer
from sd_jax.training import Trainer, TrainOptions
from tests.test_convert import run_script
from tests.tiny_models import save_diffusers_pipeline, tiny_config

# Allowed max abs error relative to the output scale. float32 on both sides with exact matmuls (conftest): outputs
# differ only by summation order, a few float32 ulps per op. Measured (printed by the tests): text encoder 4e-7,
# VAE decoder 2e-6, U-Net 1.2e-5 (its ~30 layers and two attention softmaxes per block add up; tests/test_unet.py
# allows 1e-4). A wrong weight (swapped q/k, a transposed kernel, a zeroed block) shows up at 1e-2..1.
REL_TOL = {"text_encoder": 1e-5, "vae": 1e-5, "unet": 5e-5}
KINDS = ("sd1", "sd2_v", "sd1_inpainting")


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Everything here is local: with offline mode on, any request to the hub raises instead of downloading."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        # huggingface_hub reads the variable once, at import; its HTTP session checks this constant.
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


def _random_states(config, seed: int, dtype=np.float32) -> dict[str, nnx.State]:
    """Every parameter random and distinct, biases and norm scales included (a zero bias would hide a swap)."""
    rng = np.random.default_rng(seed)
    states = {}
    for name, (_, abstract) in abstract_components(config).items():
        filled = []
        for path, variable in nnx.to_flat_state(abstract):
            shape = variable.get_value().shape
            value = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(max(np.prod(shape[:-1]), 1))
            filled.append((path, variable.replace(jnp.asarray(value.astype(dtype)))))
        states[name] = nnx.from_flat_state(filled)
    return states


def _assert_same_params(got: dict[str, nnx.State], expected: dict[str, nnx.State]) -> None:
    for name in COMPONENTS:
        a, b = state_to_flat(got[name]), state_to_flat(expected[name])
        assert sorted(a) == sorted(b), name
        for key in b:
            assert a[key].dtype == b[key].dtype, f"{name}.{key}"
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}.{key}")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random tiny diffusers folder (torch weights), fine-tuned a few steps by sd_jax (U-Net and text encoder),
    as sd_jax loads the trained model folder."""
    from tests.test_training import write_images

    root = tmp_path_factory.mktemp("source")
    save_diffusers_pipeline(tiny_config("sd1"), root / "sd1", seed=0)
    options = TrainOptions(
        output_dir=str(root / "run"),
        data=str(write_images(root / "images", n=4)),
        model=str(root / "sd1"),
        train_text_encoder=True,
        resolution=32,
        batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
    )
    Trainer(options, show_progress=False, devices=jax.devices()[:1]).run()
    tuned = load_components(root / "run" / "model")
    # The fine-tuning changed the weights: the exports carry trained parameters, not the diffusers originals.
    original = state_to_flat(load_components(root / "sd1")[1]["unet"])
    assert any(not np.array_equal(v, original[k]) for k, v in state_to_flat(tuned[1]["unet"]).items())
    return tuned


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    """The source exported both ways, and a decoy folder: the same config with other weights."""
    config, states, tokenizer = source
    root = tmp_path_factory.mktemp("exported")
    folder = export.export_diffusers(config, states, tokenizer, root / "pipeline")
    file = export.export_single_file(config, states, root / "model.safetensors", log=lambda _: None)
    decoy = export.export_diffusers(config, _random_states(config, seed=9), tokenizer, root / "decoy")
    return folder, file, decoy


# ------------------------------------------------------------------------------------ diffusers loads the exports


def _inputs(config) -> tuple[np.ndarray, ...]:
    """Token ids, U-Net sample / timesteps / context and VAE latents (NHWC)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, config.text_encoder.vocab_size, size=(2, 77), dtype=np.int32)
    sample = rng.standard_normal((2, 8, 8, config.unet.in_channels), dtype=np.float32)
    timesteps = np.array([999.0, 17.5], np.float32)
    context = rng.standard_normal((2, 77, config.unet.cross_attention_dim), dtype=np.float32)
    latents = rng.standard_normal((1, 4, 4, config.vae.latent_channels), dtype=np.float32)
    return ids, sample, timesteps, context, latents


@pytest.fixture(scope="module")
def sd_jax_outputs(source) -> dict[str, np.ndarray]:
    """sd_jax's text encoder, U-Net and VAE decoder on `_inputs`, computed once for the tests that compare."""
    config, states, _ = source
    ids, sample, timesteps, context, latents = _inputs(config)
    graphdefs = {name: graphdef for name, (graphdef, _) in abstract_components(config).items()}

    def run(name, method, *args):
        # Under jit: eager NNX dispatch compiles op by op, several times slower than one compiled call.
        call = jax.jit(lambda state, *args: method(nnx.merge(graphdefs[name], state), *args))
        return np.asarray(call(states[name], *(jnp.asarray(a) for a in args)))

    return {
        "text_encoder": run("text_encoder", lambda m, x: m(x), ids),
        "unet": run("unet", lambda m, x, t, c: m(x, t, c), sample, timesteps, context),
        "vae": run("vae", lambda m, z: m.decode(z), latents),
    }


@torch.no_grad()
def _diffusers_outputs(pipe, ids, sample, timesteps, context, latents) -> dict[str, np.ndarray]:
    def nchw(x):
        return torch.from_numpy(x).permute(0, 3, 1, 2)

    text = pipe.text_encoder(torch.from_numpy(ids).long()).last_hidden_state
    unet = pipe.unet(nchw(sample), torch.from_numpy(timesteps), encoder_hidden_states=torch.from_numpy(context)).sample
    image = pipe.vae.decode(nchw(latents)).sample
    return {
        "text_encoder": text.numpy(),
        "unet": unet.permute(0, 2, 3, 1).numpy(),
        "vae": image.permute(0, 2, 3, 1).numpy(),
    }


def _assert_parity(pipe, config, ours: dict[str, np.ndarray]) -> None:
    ref = _diffusers_outputs(pipe, *_inputs(config))
    for name in COMPONENTS:
        scale = float(np.abs(ref[name]).max())
        err = float(np.abs(ours[name] - ref[name]).max())
        print(f"{name}: max abs err {err:.3g}, output scale {scale:.3g}, relative {err / scale:.3g}")
        assert ours[name].shape == ref[name].shape, name
        np.testing.assert_allclose(ours[name], ref[name], rtol=0, atol=REL_TOL[name] * scale, err_msg=name)


def _assert_torch_weights(pipe, states) -> None:
    """The pipeline's PyTorch modules hold exactly sd_jax's parameters (buffers aside)."""
    for name in COMPONENTS:
        expected = state_to_torch(states[name])
        got = {k.removeprefix("text_model."): v.numpy() for k, v in getattr(pipe, name).state_dict().items()}
        got.pop("embeddings.position_ids", None)
        assert sorted(got) == sorted(expected), name
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{name}.{key}")


def test_diffusers_loads_the_exported_folder(source, exported, sd_jax_outputs):
    config, states, _ = source
    pipe = diffusers.DiffusionPipeline.from_pretrained(exported[0], local_files_only=True)
    assert type(pipe) is diffusers.StableDiffusionPipeline
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert dict(pipe.scheduler.config)["prediction_type"] == config.prediction_type
    assert type(pipe.scheduler).__name__ == config.scheduler["_class_name"]
    assert pipe.tokenizer("a photo of a cat").input_ids == source[2]("a photo of a cat").input_ids
    _assert_torch_weights(pipe, states)
    _assert_parity(pipe, config, sd_jax_outputs)


def test_diffusers_loads_the_exported_single_file(source, exported, sd_jax_outputs):
    """`from_single_file` offline: configs from a local folder whose own weights differ, weights from the file."""
    config, states, _ = source
    _, file, decoy = exported
    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(file), config=str(decoy), local_files_only=True)
    _assert_torch_weights(pipe, states)
    _assert_parity(pipe, config, sd_jax_outputs)


@pytest.mark.parametrize("kind", ["sd2_v", "sd1_inpainting"])
def test_diffusers_reads_sd2_and_inpainting_exports(kind, tmp_path):
    """diffusers' own converter reads the OpenCLIP layout and the 9-channel U-Net back to exactly our weights."""
    config = tiny_config(kind)
    states = _random_states(config, seed=2)
    tokenizer = load_tokenizer(None, pad_token=config.pad_token)
    folder = export.export_diffusers(config, states, tokenizer, tmp_path / "pipeline")
    file = export.export_single_file(config, states, tmp_path / "model.safetensors", log=lambda _: None)
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipe).__name__ == json.loads((folder / "model_index.json").read_text())["_class_name"]
    assert config.is_inpainting == isinstance(pipe, diffusers.StableDiffusionInpaintPipeline)
    _assert_torch_weights(pipe, states)
    cls = type(pipe)
    from_file = cls.from_single_file(str(file), config=str(folder), local_files_only=True)
    _assert_torch_weights(from_file, states)
    if kind == "sd2_v":
        with safe_open(str(file), "np") as f:
            keys = set(f.keys())
        prefix = "cond_stage_model.model.transformer.resblocks"
        layers = config.text_encoder.num_hidden_layers
        assert {f"{prefix}.{n}.attn.in_proj_weight" for n in range(layers + 1)} <= keys  # + the unused last block
        assert f"{prefix}.{layers + 1}.attn.in_proj_weight" not in keys
        assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)


# ------------------------------------------------------------------------------------------ convert(export(x)) == x


def test_exports_of_a_diffusers_folder_load_back_exactly(source, exported):
    config, states, _ = source
    folder, file, _ = exported
    _assert_same_params(load_components(folder)[1], states)
    back_config, back, _ = load_components(file, **export.single_file_load_kwargs(config))
    _assert_same_params(back, states)
    for name in COMPONENTS:
        assert getattr(back_config, name) == getattr(config, name)


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_exact(kind, fmt, tmp_path):
    config = tiny_config(kind)
    states = _random_states(config, seed=5)
    if fmt == "diffusers":
        tokenizer = load_tokenizer(None, pad_token=config.pad_token)
        path = export.export_diffusers(config, states, tokenizer, tmp_path / "pipeline")
        kwargs = {}
    else:
        path = export.export_single_file(config, states, tmp_path / "model.safetensors", log=lambda _: None)
        kwargs = export.single_file_load_kwargs(config)
    back_config, back, back_tokenizer = load_components(path, **kwargs)
    _assert_same_params(back, states)
    assert dataclasses.replace(back_config, name=config.name) == config
    assert back_tokenizer.pad_token == config.pad_token
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary leftovers


def _written_torch_weights(path, fmt: str) -> dict[str, dict[str, np.ndarray]]:
    """The tensors of an export as stored (no cast), PyTorch-named as `state_to_torch` names them."""
    if fmt == "single_file":
        return split_original(read_state_dict(path), "sd1")
    out = {}
    for name in COMPONENTS:
        file = path / name / ("model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors")
        with safe_open(str(file), "np") as f:
            assert f.metadata() == {"format": "pt"}
            out[name] = {k.removeprefix("text_model."): f.get_tensor(k) for k in f.keys()}
    return out


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_dtype_is_kept_or_cast(fmt, tmp_path):
    """bfloat16 states are written as bfloat16; dtype="float16" casts. Either way the values are exact."""
    config = tiny_config("sd1")
    states = _random_states(config, seed=6, dtype=ml_dtypes.bfloat16)
    tokenizer = load_tokenizer(None, pad_token=config.pad_token)
    for dtype, expected_dtype in ((None, ml_dtypes.bfloat16), ("float16", np.float16)):
        if fmt == "diffusers":
            path = export.export_diffusers(config, states, tokenizer, tmp_path / f"{dtype}", dtype=dtype)
            text_config = json.loads((path / "text_encoder" / "config.json").read_text())
            assert text_config["torch_dtype"] == np.dtype(expected_dtype).name
        else:
            path = export.export_single_file(
                config, states, tmp_path / f"{dtype}.safetensors", dtype=dtype, log=lambda _: None
            )
        written = _written_torch_weights(path, fmt)
        for name in COMPONENTS:
            expected = state_to_torch(states[name])
            assert sorted(written[name]) == sorted(expected), name
            for key, value in expected.items():
                assert written[name][key].dtype == expected_dtype, f"{name}.{key}"
                np.testing.assert_array_equal(written[name][key], value.astype(expected_dtype), err_msg=key)


# ---------------------------------------------------------------------------------------------------- refusals


def test_existing_output_is_refused_then_replaced_whole(tmp_path):
    config = tiny_config("sd1")
    tokenizer = load_tokenizer(None, pad_token=config.pad_token)
    first, second = _random_states(config, seed=7), _random_states(config, seed=8)
    folder = export.export_diffusers(config, first, tokenizer, tmp_path / "pipeline")
    file = export.export_single_file(config, first, tmp_path / "model.safetensors", log=lambda _: None)
    before = file.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        export.export_diffusers(config, second, tokenizer, folder)
    with pytest.raises(FileExistsError, match="already exists"):
        export.export_single_file(config, second, file)
    assert file.read_bytes() == before
    _assert_same_params(load_components(folder)[1], first)
    export.export_diffusers(config, second, tokenizer, folder, overwrite=True)
    export.export_single_file(config, second, file, overwrite=True, log=lambda _: None)
    _assert_same_params(load_components(folder)[1], second)
    _assert_same_params(load_components(file, **export.single_file_load_kwargs(config))[1], second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "pipeline"]


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda c: dataclasses.replace(c, text_encoder=dataclasses.replace(c.text_encoder, hidden_act="gelu_new")),
            "hidden_act='gelu_new' has no original single-file layout",
        ),
        (
            lambda c: dataclasses.replace(c, vae=dataclasses.replace(c.vae, mid_block_add_attention=False)),
            r"needs and the model lacks \(\d+\): vae.decoder.mid_block.attentions.0",
        ),
        (
            lambda c: dataclasses.replace(c, unet=dataclasses.replace(c.unet, layers_per_block=(1, 2))),
            r"has no place for \(\d+\): unet.down_blocks.1.resnets.1",
        ),
    ],
    ids=["activation", "vae-without-mid-attention", "uneven-layers-per-block"],
)
def test_topologies_without_an_original_layout_raise(change, message, tmp_path):
    config = change(tiny_config("sd1"))
    with pytest.raises(ValueError, match=message):
        export.export_single_file(config, _random_states(config, seed=0), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_bad_format_is_one_line_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_or_exit(export.export, str(tmp_path / "no_such_model"), tmp_path / "out", format="onnx")
    assert exit_.value.code == 1
    assert capsys.readouterr().err == "error: --format must be one of diffusers, single_file, got 'onnx'\n"


# ------------------------------------------------------------------------------------------------------ the script


def test_script_exports_the_default_model_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "tiny.safetensors"
    result = run_script("scripts/export.py", "--format=single_file", f"--output={out}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    config, states, _ = load_components(None)
    _assert_same_params(load_components(out, **export.single_file_load_kwargs(config))[1], states)
    again = run_script("scripts/export.py", "--format=single_file", f"--output={out}")
    assert again.returncode == 1
    assert "Traceback" not in again.stderr
    assert again.stderr.splitlines() == [f"error: {out} already exists; choose another --output or pass --overwrite"]
