"""Loading without a second copy of the weights: lazy `.safetensors` reads, per-tensor host casts, consumed dicts.

The memory itself is measured by scripts/benchmark_load.py; these tests check the mechanisms.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from sd_jax.convert.params import clip_state_dict_for_flax, state_from_torch
from sd_jax.convert.torch_files import CheckpointError, SafetensorsFile, read_state_dict, write_safetensors


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "bf16": rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
        "f64": rng.standard_normal((2,)),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "u8": np.arange(4, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_safetensors_file_reads_what_safetensors_wrote(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_arrays(), str(path), metadata={"format": "pt"})
    expected = load_file(str(path))
    got = read_state_dict(path)
    assert isinstance(got, SafetensorsFile)
    assert sorted(got) == sorted(expected) and len(got) == len(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert "f32" in got and "nope" not in got
    with pytest.raises(KeyError):
        got["nope"]


def test_safetensors_file_reads_each_tensor_when_it_is_looked_up(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": np.ones((64,), np.float32), "b": np.full((64,), 2, np.float32)}, str(path))
    lazy = SafetensorsFile(path)
    first = lazy["a"]
    first[:] = 0  # a new array each time: nothing is cached or shared with the file
    np.testing.assert_array_equal(lazy["a"], np.ones(64, np.float32))
    path.write_bytes(path.read_bytes()[:-16])  # the file shrinks after opening: only the lookup can notice
    with pytest.raises(CheckpointError, match="ends inside the tensor"):
        lazy["b"]


def test_written_safetensors_read_back_with_safetensors_itself(tmp_path):
    arrays = _arrays()
    arrays["jax"] = jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)  # fetched from the device when written
    arrays["transposed"] = np.arange(6, dtype=np.float32).reshape(2, 3).T
    path = tmp_path / "w.safetensors"
    write_safetensors(path, arrays, {"format": "pt"})
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
    back = load_file(str(path))
    assert back.keys() == arrays.keys()
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype, name
        np.testing.assert_array_equal(back[name], np.asarray(value), err_msg=name)
    with pytest.raises(ValueError, match="cannot store dtype complex64"):
        write_safetensors(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex64)})


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda data: data[:4], "header length"),
        (lambda data: (10**9).to_bytes(8, "little") + data[8:], "header length"),
        (lambda data: data[:8] + b"[" + data[9:], "not a JSON object|Expecting"),
        (lambda data: data[: len(data) // 2], "do not hold"),
    ],
)
def test_damaged_safetensors_are_refused_on_opening(tmp_path, damage, match):
    path = tmp_path / "w.safetensors"
    save_file({"a": np.ones((64, 64), np.float32)}, str(path))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=f"w.safetensors: not a readable .safetensors file.*({match})"):
        SafetensorsFile(path)


class _Layer(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.conv = nnx.Conv(2, 5, (3, 3), rngs=rngs)


def _torch_weights(rng):
    return {
        "linear.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "linear.bias": rng.standard_normal((4,)).astype(np.float32),
        "conv.weight": rng.standard_normal((5, 2, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal((5,)).astype(np.float32),
    }


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_host_cast_equals_the_device_cast(dtype):
    """Each tensor is cast with numpy / ml_dtypes before it is placed; the values are XLA's own cast's."""
    abstract = nnx.split(nnx.eval_shape(lambda: _Layer(nnx.Rngs(0))))[1]
    weights = _torch_weights(np.random.default_rng(1))
    state = state_from_torch(abstract, weights, dtype=dtype)
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    assert flat["linear.kernel"].dtype == dtype
    np.testing.assert_array_equal(
        np.asarray(flat["linear.kernel"]), np.asarray(jnp.asarray(weights["linear.weight"].T, dtype))
    )
    np.testing.assert_array_equal(
        np.asarray(flat["conv.kernel"]), np.asarray(jnp.asarray(weights["conv.weight"].transpose(2, 3, 1, 0), dtype))
    )
    assert all(isinstance(v, jax.Array) for v in flat.values())


def test_consume_pops_each_array_once_it_is_placed():
    abstract = nnx.split(nnx.eval_shape(lambda: _Layer(nnx.Rngs(0))))[1]
    weights = _torch_weights(np.random.default_rng(1))
    kept = dict(weights)
    state_from_torch(abstract, kept)
    assert kept.keys() == weights.keys()
    state_from_torch(abstract, weights, consume=True)
    assert weights == {}


class _CountingDict(dict):
    def __init__(self, *args):
        super().__init__(*args)
        self.lookups = []

    def __getitem__(self, name):
        self.lookups.append(name)
        return super().__getitem__(name)


class _Linear(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)


def test_clip_renaming_reads_nothing_and_filling_reads_each_tensor_once():
    source = _CountingDict(
        {
            "text_model.linear.weight": np.ones((4, 3), np.float32),
            "text_model.linear.bias": np.ones((4,), np.float32),
            "text_model.embeddings.position_ids": np.arange(4),
        }
    )
    renamed = clip_state_dict_for_flax(source)
    assert sorted(renamed) == ["linear.bias", "linear.weight"]
    assert source.lookups == []
    state_from_torch(nnx.split(nnx.eval_shape(lambda: _Linear(nnx.Rngs(0))))[1], renamed)
    assert sorted(source.lookups) == ["text_model.linear.bias", "text_model.linear.weight"]
