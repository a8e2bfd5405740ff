"""Original single-file Stable Diffusion checkpoints -> diffusers-named state dicts, and safe weight-file reading."""

import os

import diffusers
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from sd_jax.convert.single_file import detect_model_type, infer_configs, split_original
from sd_jax.convert.torch_files import CheckpointError, read_state_dict
from tests.single_file_writer import original_state_dict, write_original_single_file

# Tiny heads: shapes cannot tell head counts, so tiny models pass them as overrides.
UNET_HEADS = {"sd1": 8, "sd2": [2, 2, 4, 4]}
TEXT_HEADS = 4
SD2_TEXT_LAYERS = 23  # as the hub's SD 2 text encoder; the writer adds the unused 24th OpenCLIP block (index 23)


def _randomize(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict with every float tensor random (no zero-initialised biases that would hide a swap)."""
    generator = torch.Generator().manual_seed(seed)
    sd = module.state_dict()
    return {k: torch.randn(v.shape, generator=generator) for k, v in sd.items() if v.is_floating_point()}


def _tiny_unet(family: str, in_channels: int = 4) -> torch.nn.Module:
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=UNET_HEADS[family],
        use_linear_projection=family == "sd2",
        norm_num_groups=32,
    )


def _tiny_vae() -> torch.nn.Module:
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    )


def _tiny_text(family: str) -> torch.nn.Module:
    config = transformers.CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2 if family == "sd1" else SD2_TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        max_position_embeddings=77,
        hidden_act="quick_gelu" if family == "sd1" else "gelu",
        bos_token_id=0,
        eos_token_id=2,
    )
    return transformers.CLIPTextModel(config)


class Tiny:
    """Random diffusers-named weights of one model type, the models they came from, and the expected numpy."""

    def __init__(self, model_type: str, seed: int = 0):
        family = model_type.removesuffix("_inpainting")
        self.model_type = model_type
        self.unet = _tiny_unet(family, 9 if model_type.endswith("_inpainting") else 4)
        self.vae = _tiny_vae()
        self.text = _tiny_text(family)
        self.unet_sd = _randomize(self.unet, seed)
        self.vae_sd = _randomize(self.vae, seed + 1)
        self.text_sd = _randomize(self.text, seed + 2)

    def expected(self, ema: bool = False) -> dict[str, dict[str, np.ndarray]]:
        unet = {k: (v + 1.0 if ema else v).numpy() for k, v in self.unet_sd.items()}
        text = {k.removeprefix("text_model."): v.numpy() for k, v in self.text_sd.items()}
        return {"unet": unet, "vae": {k: v.numpy() for k, v in self.vae_sd.items()}, "text_encoder": text}

    def write(self, path, ema: bool = False):
        write_original_single_file(self.unet_sd, self.vae_sd, self.text_sd, self.model_type, path, ema=ema)
        return path


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tiny(request):
    return Tiny(request.param)


def _assert_components_equal(got, expected):
    assert set(got) == set(expected)
    for component in expected:
        g, e = got[component], expected[component]
        assert sorted(g) == sorted(e), (
            f"{component}: missing {sorted(set(e) - set(g))[:10]}, extra {sorted(set(g) - set(e))[:10]}"
        )
        for name in e:
            assert g[name].shape == e[name].shape, f"{component}.{name}"
            np.testing.assert_array_equal(g[name], e[name], err_msg=f"{component}.{name}")


# ------------------------------------------------------------------------------------------- (a) round trip


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("ema", [False, True])
def test_round_trip(tiny, tmp_path, suffix, ema):
    path = tiny.write(tmp_path / f"model{suffix}", ema=ema)
    state_dict = read_state_dict(path)
    assert detect_model_type(state_dict) == tiny.model_type
    components = split_original(state_dict, tiny.model_type, use_ema=True)
    _assert_components_equal(components, tiny.expected(ema=ema))


def test_use_ema_false_takes_the_training_weights(tiny, tmp_path):
    state_dict = read_state_dict(tiny.write(tmp_path / "model.safetensors", ema=True))
    components = split_original(state_dict, tiny.model_type, use_ema=False)
    _assert_components_equal(components, tiny.expected(ema=False))


@pytest.mark.parametrize("model_type", ["sd1_inpainting", "sd2_inpainting"])
def test_inpainting_round_trip(tmp_path, model_type):
    tiny = Tiny(model_type, seed=5)
    state_dict = read_state_dict(tiny.write(tmp_path / "inpaint.safetensors"))
    assert detect_model_type(state_dict) == model_type
    components = split_original(state_dict, model_type)
    _assert_components_equal(components, tiny.expected())
    assert components["unet"]["conv_in.weight"].shape[1] == 9


def test_inferred_configs_rebuild_the_models(tiny, tmp_path):
    """The configs, built into diffusers / transformers models, take the converted weights with strict loading."""
    components = split_original(read_state_dict(tiny.write(tmp_path / "m.safetensors")), tiny.model_type)
    family = tiny.model_type
    configs = infer_configs(
        components,
        family,
        overrides={"unet": {"attention_head_dim": UNET_HEADS[family]}, "text_encoder": {"num_attention_heads": 4}},
    )
    unet_config = {k: v for k, v in configs["unet"].items() if not k.startswith("_")}
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "use_linear_projection"):
        assert tuple(np.atleast_1d(unet_config[key])) == tuple(np.atleast_1d(tiny.unet.config[key])), key
    assert unet_config["down_block_types"] == list(tiny.unet.config.down_block_types)
    assert unet_config["up_block_types"] == list(tiny.unet.config.up_block_types)
    unet = diffusers.UNet2DConditionModel(**unet_config)
    unet.load_state_dict({k: torch.from_numpy(v) for k, v in components["unet"].items()}, strict=True)
    vae = diffusers.AutoencoderKL(**{k: v for k, v in configs["vae"].items() if not k.startswith("_")})
    vae.load_state_dict({k: torch.from_numpy(v) for k, v in components["vae"].items()}, strict=True)
    text_config = transformers.CLIPTextConfig(**configs["text_encoder"])
    assert text_config.hidden_act == tiny.text.config.hidden_act
    assert text_config.num_hidden_layers == tiny.text.config.num_hidden_layers
    assert text_config.intermediate_size == tiny.text.config.intermediate_size
    text = transformers.CLIPTextModel(text_config)
    text.load_state_dict({k: torch.from_numpy(v) for k, v in components["text_encoder"].items()}, strict=True)


def test_sd2_standard_head_counts_from_widths():
    """Real SD 2.x widths give the hub configs' head counts (64-wide heads)."""
    unet = {
        f"down_blocks.{i}.resnets.{j}.conv1.weight": np.zeros((c, 1, 1, 1), np.float32)
        for i, c in enumerate((320, 640, 1280, 1280))
        for j in range(2)
    }
    unet.update(
        {
            "conv_in.weight": np.zeros((320, 4, 3, 3), np.float32),
            "conv_out.weight": np.zeros((4, 320, 3, 3), np.float32),
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight": np.zeros((1280, 1024), np.float32),
            "mid_block.attentions.0.proj_in.weight": np.zeros((1280, 1280), np.float32),
        }
    )
    config = infer_configs({"unet": unet, "vae": _fake_vae(), "text_encoder": _fake_text(1024, 4096)}, "sd2")
    assert config["unet"]["attention_head_dim"] == [5, 10, 20, 20]
    assert config["unet"]["use_linear_projection"] is True
    assert config["unet"]["upcast_attention"] is True
    assert config["text_encoder"]["num_attention_heads"] == 16
    assert config["text_encoder"]["hidden_act"] == "gelu"
    sd1 = infer_configs({"unet": unet, "vae": _fake_vae(), "text_encoder": _fake_text(768, 3072)}, "sd1")
    assert sd1["unet"]["attention_head_dim"] == 8
    assert sd1["text_encoder"]["num_attention_heads"] == 12
    assert sd1["text_encoder"]["hidden_act"] == "quick_gelu"


def _fake_vae():
    z = np.zeros
    return {
        "encoder.down_blocks.0.resnets.0.conv1.weight": z((128, 3, 1, 1)),
        "encoder.conv_in.weight": z((128, 3, 3, 3)),
        "decoder.conv_out.weight": z((3, 128, 3, 3)),
        "decoder.conv_in.weight": z((512, 4, 3, 3)),
    }


def _fake_text(width, mlp):
    return {
        "embeddings.token_embedding.weight": np.zeros((49408, width)),
        "embeddings.position_embedding.weight": np.zeros((77, width)),
        "encoder.layers.0.mlp.fc1.weight": np.zeros((mlp, width)),
    }


# ------------------------------------------------------------------ (b) independent check with diffusers' converter


def test_writer_agrees_with_diffusers_converter(tiny, tmp_path):
    """diffusers' own single-file conversion functions read the written file back to the same weights.

    The conversion functions are called directly with the tiny models' configs (offline); diffusers has no
    single-file loader for a bare text encoder, and these functions also cover the EMA extraction.
    """
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file

    checkpoint = load_file(tiny.write(tmp_path / "m.safetensors", ema=True))
    expected = tiny.expected(ema=True)

    unet = sfu.convert_ldm_unet_checkpoint(checkpoint, dict(tiny.unet.config), extract_ema=True)
    _assert_components_equal({"unet": {k: v.numpy() for k, v in unet.items()}}, {"unet": expected["unet"]})
    vae = sfu.convert_ldm_vae_checkpoint(checkpoint, dict(tiny.vae.config))
    _assert_components_equal({"vae": {k: v.numpy() for k, v in vae.items()}}, {"vae": expected["vae"]})

    if tiny.model_type == "sd1":
        text = sfu.convert_ldm_clip_checkpoint(checkpoint)
        text.pop("text_model.embeddings.position_ids")
    else:
        text = sfu.convert_open_clip_checkpoint(tiny.text, checkpoint)
        # Some diffusers versions keep the OpenCLIP projection (for CLIPTextModelWithProjection); SD does not use it.
        text.pop("text_projection.weight", None)
    text = {k.removeprefix("text_model."): v.numpy() for k, v in text.items()}
    _assert_components_equal({"text_encoder": text}, {"text_encoder": expected["text_encoder"]})


# --------------------------------------------------------------------------------------------- (c) detection


def test_detect_model_types(tmp_path):
    sd1 = Tiny("sd1")
    sd = original_state_dict(sd1.unet_sd, sd1.vae_sd, sd1.text_sd, "sd1")
    assert detect_model_type(sd) == "sd1"
    conv_in = sd["model.diffusion_model.input_blocks.0.0.weight"]
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(conv_in.shape[0], 9, 3, 3)
    assert detect_model_type(sd) == "sd1_inpainting"
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(conv_in.shape[0], 5, 3, 3)
    with pytest.raises(CheckpointError, match="5 input channels"):
        detect_model_type(sd)


def test_detect_rejects_non_sd_files():
    with pytest.raises(CheckpointError, match="not a Stable Diffusion.*found.*classifier"):
        detect_model_type({"classifier.weight": np.zeros((2, 2)), "classifier.bias": np.zeros(2)})
    sdxl = {
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": np.zeros((4, 4)),
        "model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 4, 3, 3)),
    }
    with pytest.raises(CheckpointError, match="SDXL"):
        detect_model_type(sdxl)
    with pytest.raises(CheckpointError, match="unknown model type"):
        split_original({}, "sdxl")


# ----------------------------------------------------------------------------------------------- (d) errors


@pytest.fixture(scope="module")
def sd1_dict():
    tiny = Tiny("sd1")
    return {k: v.numpy() for k, v in original_state_dict(tiny.unet_sd, tiny.vae_sd, tiny.text_sd, "sd1").items()}


def test_unexpected_key_is_listed(sd1_dict):
    sd = dict(sd1_dict)
    sd["model.diffusion_model.label_emb.0.0.weight"] = np.zeros((4, 4), np.float32)
    sd["something_else"] = np.zeros(1, np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(2\): model.diffusion_model.label_emb.0.0.weight"):
        split_original(sd, "sd1")


@pytest.mark.parametrize(
    "key",
    [
        "model.diffusion_model.output_blocks.5.2.conv.bias",
        "model.diffusion_model.input_blocks.7.0.skip_connection.bias",
        "first_stage_model.decoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    ],
)
def test_missing_key_is_listed(sd1_dict, key):
    sd = dict(sd1_dict)
    del sd[key]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): " + key.replace(".", r"\.")):
        split_original(sd, "sd1")


def test_truncated_safetensors(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "cut.safetensors"
    save_file({"a": np.ones((64, 64), np.float32)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        read_state_dict(path)


def test_truncated_ckpt(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"a": torch.ones(64, 64)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt.*not a readable PyTorch file"):
        read_state_dict(path)


class _RunsCode:
    """Pickles as a call to os.system: what a malicious checkpoint does."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _RunsCode(f"touch {marker}")}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load.*system.*may contain code"):
        read_state_dict(path)
    assert not marker.exists()


def test_ckpt_unwraps_state_dict_and_skips_non_tensors(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"state_dict": {"w": torch.arange(6.0).reshape(2, 3), "step": 5}, "global_step": 10}, path)
    sd = read_state_dict(path)
    assert list(sd) == ["w"]
    np.testing.assert_array_equal(sd["w"], np.arange(6.0, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_bfloat16_stays_exact(tmp_path, suffix):
    values = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    path = tmp_path / f"bf16{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"w": values}, str(path))
    else:
        torch.save({"w": values}, path)
    got = read_state_dict(path)["w"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), values.float().numpy())


def test_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="is a directory"):
        read_state_dict(tmp_path)
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown weight file extension '.npz'"):
        read_state_dict(tmp_path / "weights.npz")


@pytest.mark.parametrize("component", ["unet", "vae"])
def test_writer_agrees_with_diffusers_from_single_file(tiny, tmp_path, component):
    """`from_single_file` offline: the config from a local save_pretrained folder, the weights from our file."""
    model = tiny.unet if component == "unet" else tiny.vae
    model.save_pretrained(tmp_path / "local" / component)
    path = tiny.write(tmp_path / "m.safetensors")
    cls = type(model)
    loaded = cls.from_single_file(str(path), config=str(tmp_path / "local"), subfolder=component, local_files_only=True)
    got = {k: v.numpy() for k, v in loaded.state_dict().items()}
    _assert_components_equal({component: got}, {component: tiny.expected()[component]})


# ---------------------------------------------------------------------------------------------------------------
# SD 2.x: epsilon (512 base) or v-prediction (768-v), as the ecosystem decides for a single file


@pytest.fixture(scope="module")
def sd2_files(tmp_path_factory):
    """The same tiny SD 2.x weights as .safetensors (no global_step) and as .ckpt files with two global_steps."""
    folder = tmp_path_factory.mktemp("sd2")
    tiny = Tiny("sd2", seed=11)
    state_dict = original_state_dict(tiny.unet_sd, tiny.vae_sd, tiny.text_sd, "sd2")
    tiny.write(folder / "plain.safetensors")
    for step in (875000, 110000):
        torch.save({"state_dict": state_dict, "global_step": step}, folder / f"step{step}.ckpt")
    return folder


def _load_sd2(path, **kwargs):
    from sd_jax.convert.readers import convert_single_file

    notes = []
    overrides = {"unet": {"attention_head_dim": UNET_HEADS["sd2"]}, "text_encoder": {"num_attention_heads": 4}}
    config, _, _ = convert_single_file(path, "float32", overrides=overrides, log=notes.append, **kwargs)
    return config, notes


@pytest.mark.parametrize(
    "name, yaml_text, prediction, why",
    [
        ("plain.safetensors", None, "v_prediction", "no global_step"),
        ("step875000.ckpt", None, "epsilon", "global_step 875000"),
        ("step110000.ckpt", None, "v_prediction", "global_step 110000"),
        # A config beside the file decides over the step: the original v2-inference-v.yaml says "v".
        (
            "step875000.ckpt",
            'model:\n  params:\n    parameterization: "v"\n    linear_start: 0.00085\n',
            "v_prediction",
            "parameterization: v",
        ),
        ("plain.safetensors", "model:\n  params:\n    linear_start: 0.00085\n", "epsilon", "parameterization: eps"),
    ],
)
def test_sd2_single_file_prediction_type(sd2_files, tmp_path, name, yaml_text, prediction, why):
    path = tmp_path / name
    os.symlink(sd2_files / name, path)
    if yaml_text is not None:
        path.with_suffix(".yaml").write_text(yaml_text)
    config, notes = _load_sd2(path)
    assert config.scheduler["prediction_type"] == prediction
    assert config.unet.sample_size == (96 if prediction == "v_prediction" else 64)  # 768 or 512 pixels
    assert len(notes) == 1 and why in notes[0] and prediction.replace("_", "-") in notes[0].replace("_", "-")
    # --model_type still overrides, silently.
    forced = "sd21_base" if prediction == "v_prediction" else "sd21_768_v"
    config, notes = _load_sd2(path, model_type=forced)
    assert config.scheduler["prediction_type"] != prediction and not notes


def test_sd2_unreadable_yaml_is_a_one_line_error(sd2_files, tmp_path):
    path = tmp_path / "plain.safetensors"
    os.symlink(sd2_files / "plain.safetensors", path)
    path.with_suffix(".yaml").write_text("model: [unclosed")
    with pytest.raises(CheckpointError, match="plain.yaml: not an original Stable Diffusion config"):
        _load_sd2(path)
