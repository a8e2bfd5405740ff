"""CLIPTextModel: unit tests and parity with transformers' PyTorch CLIPTextModel on random weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from sd_jax.convert.params import ConversionError, abstract_model, clip_state_dict_for_flax, state_from_torch
from sd_jax.modules.clip_text import CLIPTextConfig, CLIPTextModel

# Float32 on CPU with "highest" matmul precision (conftest): both sides do the same float32 arithmetic in a
# different order (fused vs unfused kernels, erf implementations), so outputs of order 1 after layer norm agree
# to a few float32 ulps per op; over 4 layers that stays well below 1e-5 relative / 1e-5 absolute.
RTOL = 1e-5
ATOL = 1e-5

SD1_TINY = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
SD2_TINY = {**SD1_TINY, "hidden_act": "gelu"}


def torch_model(cfg: dict, seed: int = 0) -> transformers.CLIPTextModel:
    """A transformers CLIPTextModel with every weight random, layer norm scales and biases included."""
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(**cfg, attn_implementation="eager")
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def torch_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def load_flax(config: CLIPTextConfig, state_dict: dict) -> CLIPTextModel:
    graphdef, abstract = abstract_model(lambda: CLIPTextModel(config, rngs=nnx.Rngs(0)))
    state = state_from_torch(abstract, clip_state_dict_for_flax(state_dict), component="text_encoder")
    return nnx.merge(graphdef, state)


def random_ids(batch: int = 3, length: int = 77, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 49406, size=(batch, length), dtype=np.int32)
    ids[:, 0] = 49406
    ids[0, 10:] = 49407  # a padded prompt, as the pipelines feed it
    return ids


def max_rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("cfg", [SD1_TINY, SD2_TINY], ids=["sd1_quick_gelu", "sd2_gelu"])
def test_parity_with_transformers(cfg):
    tmodel = torch_model(cfg)
    config = CLIPTextConfig.from_dict(tmodel.config.to_dict())
    assert config.hidden_act == cfg["hidden_act"]
    model = load_flax(config, torch_state_dict(tmodel))
    ids = random_ids()
    with torch.no_grad():
        out = tmodel(torch.from_numpy(ids).long(), output_hidden_states=True)
        ref_last = out.last_hidden_state.numpy()
        ref_skip2 = tmodel.final_layer_norm(out.hidden_states[-2]).numpy()
        ref_hidden = [h.numpy() for h in out.hidden_states]

    last = model(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(last), ref_last, rtol=RTOL, atol=ATOL)
    skip2 = model(jnp.asarray(ids), clip_skip=2)
    np.testing.assert_allclose(np.asarray(skip2), ref_skip2, rtol=RTOL, atol=ATOL)
    hidden = model.hidden_states(jnp.asarray(ids))
    assert len(hidden) == len(ref_hidden) == cfg["num_hidden_layers"] + 1
    for ours, ref in zip(hidden, ref_hidden, strict=False):
        # Pre-norm residual streams grow with depth; compare relative to each state's scale.
        assert max_rel_err(ours, ref) < 1e-5
    print(
        f"{cfg['hidden_act']}: last rel err {max_rel_err(last, ref_last):.2e}, "
        f"clip_skip=2 rel err {max_rel_err(skip2, ref_skip2):.2e}"
    )


def test_shorter_sequence_matches_transformers():
    tmodel = torch_model(SD1_TINY, seed=3)
    model = load_flax(CLIPTextConfig(**SD1_TINY), torch_state_dict(tmodel))
    ids = random_ids(batch=2, length=12)
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, rtol=RTOL, atol=ATOL)


def test_causal():
    """A token's embedding depends only on the tokens before it."""
    model = CLIPTextModel(CLIPTextConfig(**SD1_TINY), rngs=nnx.Rngs(0))
    ids = random_ids(batch=1)
    changed = ids.copy()
    changed[0, 40:] = 123
    a, b = model(jnp.asarray(ids)), model(jnp.asarray(changed))
    np.testing.assert_array_equal(np.asarray(a[:, :40]), np.asarray(b[:, :40]))
    assert not np.allclose(np.asarray(a[:, 40:]), np.asarray(b[:, 40:]))


@pytest.mark.parametrize("prefixed", [False, True], ids=["transformers5_layout", "hub_text_model_layout"])
def test_load_saved_safetensors(tmp_path, prefixed):
    tmodel = torch_model(SD2_TINY, seed=5)
    tmodel.save_pretrained(tmp_path)
    state_dict = load_file(tmp_path / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in state_dict)
    if prefixed:
        # What hub SD 1.5 / 2.1 text_encoder folders hold (transformers 4), with the old position_ids buffer.
        state_dict = {f"text_model.{k}": v for k, v in state_dict.items()}
        state_dict["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
        save_file(state_dict, tmp_path / "hub.safetensors")
        state_dict = load_file(tmp_path / "hub.safetensors")
    config = CLIPTextConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    model = load_flax(config, state_dict)
    ids = random_ids()
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, rtol=RTOL, atol=ATOL)


def test_jit_over_split_state():
    tmodel = torch_model(SD1_TINY, seed=7)
    model = load_flax(CLIPTextConfig(**SD1_TINY), torch_state_dict(tmodel))
    graphdef, state = nnx.split(model)

    @jax.jit
    def encode(state, ids):
        m = nnx.merge(graphdef, state)
        return m(ids), m(ids, clip_skip=2)

    ids = random_ids()
    last, skip2 = encode(state, jnp.asarray(ids))
    with torch.no_grad():
        out = tmodel(torch.from_numpy(ids).long(), output_hidden_states=True)
        ref_skip2 = tmodel.final_layer_norm(out.hidden_states[-2]).numpy()
    np.testing.assert_allclose(np.asarray(last), out.last_hidden_state.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(skip2), ref_skip2, rtol=RTOL, atol=ATOL)


def test_bfloat16_close_to_float32():
    config = CLIPTextConfig(**SD1_TINY)
    model = CLIPTextModel(config, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    bf16 = nnx.merge(
        nnx.graphdef(CLIPTextModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))),
        jax.tree.map(lambda x: x.astype(jnp.bfloat16), state),
    )
    ids = jnp.asarray(random_ids())
    out = bf16(ids)
    assert out.dtype == jnp.bfloat16
    # A sanity check, not parity: bf16 keeps 8 bits of mantissa (ulp 2^-8 ~ 0.4%); 4 layers measured ~1.3%.
    assert max_rel_err(out.astype(jnp.float32), model(ids)) < 0.05


def test_eval_shape_and_parameter_count():
    config = CLIPTextConfig(**SD1_TINY)
    _, abstract = abstract_model(lambda: CLIPTextModel(config, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    d, f, n = 64, 128, 4
    per_layer = 4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d)
    expected = 49408 * d + 77 * d + n * per_layer + 2 * d
    assert sum(int(np.prod(x.shape)) for x in leaves) == expected
    assert expected == sum(
        p.numel() for p in transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD1_TINY)).parameters()
    )


def test_clip_skip_validation():
    model = CLIPTextModel(CLIPTextConfig(**SD1_TINY), rngs=nnx.Rngs(0))
    ids = jnp.asarray(random_ids(batch=1))
    assert model(ids, clip_skip=4).shape == (1, 77, 64)
    for bad in (0, 5, -1, 1.0, True):
        with pytest.raises(ValueError, match="clip_skip"):
            model(ids, clip_skip=bad)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(jnp.zeros((1, 78), jnp.int32))


def test_config_round_trip_and_errors():
    config = CLIPTextConfig.from_dict(transformers.CLIPTextConfig(**SD2_TINY).to_dict())
    assert config == CLIPTextConfig(**SD2_TINY)
    assert CLIPTextConfig.from_dict(transformers.CLIPTextConfig(**config.to_dict()).to_dict()) == config
    # A hub SD 2.1 text_encoder/config.json, abridged.
    sd21 = {
        "architectures": ["CLIPTextModel"],
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "model_type": "clip_text_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "projection_dim": 512,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "layer_norm_eps": 1e-05,
        "torch_dtype": "float32",
        "dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    assert CLIPTextConfig.from_dict(sd21).num_hidden_layers == 23
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_dict(dict(sd21, hidden_act="relu"))
    with pytest.raises(ValueError, match="model_type"):
        CLIPTextConfig.from_dict({"model_type": "clip", "text_config": {}})
    with pytest.raises(ValueError, match="architecture"):
        CLIPTextConfig.from_dict(dict(sd21, architectures=["CLIPVisionModel"]))
    with pytest.raises(ValueError, match="multiple"):
        CLIPTextConfig(**dict(SD1_TINY, num_attention_heads=5))


def test_state_dict_errors():
    sd = torch_state_dict(torch_model(SD1_TINY))
    config = CLIPTextConfig(**SD1_TINY)
    with pytest.raises(ConversionError, match="unexpected keys.*text_projection"):
        load_flax(config, dict(sd, **{"text_projection.weight": np.zeros((64, 64), np.float32)}))
    with pytest.raises(ConversionError, match="missing keys.*final_layer_norm"):
        load_flax(config, {k: v for k, v in sd.items() if not k.startswith("final_layer_norm")})
    with pytest.raises(ValueError, match="prefix"):
        clip_state_dict_for_flax({"text_model.final_layer_norm.bias": 0, "final_layer_norm.bias": 0})
