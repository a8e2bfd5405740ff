"""LoRA files against diffusers' `load_lora_weights` + `fuse_lora` on the same random weights, and every way a file
can be wrong."""

import copy
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from sd_jax import parallel
from sd_jax.convert.params import state_to_torch
from sd_jax.lora import (
    LORA_SUFFIXES,
    ActiveLoRA,
    LoRAError,
    apply_loras,
    check_lora,
    module_delta,
    read_lora,
    short_hash,
)
from sd_jax.models import abstract_components, random_components
from tests.tiny_models import diffusers_pipeline, tiny_config

PROMPT, NEGATIVE = "a photo of a cat", "blurry"
RUN = dict(height=32, width=32, guidance_scale=5.0)
STEPS = 4
# Separate multipliers for the two components, as AUTOMATIC1111's <lora:name:te:unet>.
TE_WEIGHT, UNET_WEIGHT = 0.7, 0.9
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


# ------------------------------------------------------------------------------------------------- random LoRA files


def torch_shapes(config) -> dict[str, dict[str, tuple]]:
    """component -> every Linear / Conv module's dotted name -> its PyTorch weight shape (out, in[, kh, kw])."""
    out = {}
    for component in ("text_encoder", "unet"):
        _, abstract = abstract_components(config)[component]
        modules = {}
        for path, variable in nnx.to_flat_state(abstract):
            if path[-1] == "kernel":
                shape = variable.get_value().shape
                modules[".".join(map(str, path[:-1]))] = (shape[-1], shape[-2]) + tuple(shape[:-2])
        out[component] = modules
    return out


def random_pairs(config, seed: int, gain: float) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, int]]:
    """(component, module) -> (down, up, rank), PyTorch layout: rank 4 for Linear / 1x1 layers, 2 for 3x3 convolutions
    (LoCon); scaled so that up @ down changes each weight by about `gain` times its own size."""
    rng = np.random.default_rng(seed)
    pairs = {}
    for component, modules in torch_shapes(config).items():
        for name, shape in modules.items():
            fan_out, fan_in, window = shape[0], shape[1], tuple(shape[2:])
            rank = 2 if window not in ((), (1, 1)) else 4
            down = rng.standard_normal((rank, fan_in) + window) / math.sqrt(fan_in * math.prod(window))
            up = rng.standard_normal((fan_out, rank) + ((1, 1) if window else ())) * gain / math.sqrt(rank)
            pairs[(component, name)] = (down.astype(np.float32), up.astype(np.float32), rank)
    return pairs


def kohya_alpha(component: str, name: str, rank: int) -> float:
    """2 for the attention projections and the whole text encoder, other U-Net modules 1 or 3.

    diffusers turns a kohya file's alphas into PEFT's one `lora_alpha` (the most common) plus per-module patterns,
    and its patterns never match attention projections (the names carry `processor.to_q_lora`) nor, with
    transformers >= 5, any text-encoder module (the names carry `text_model.`, the model no longer does): there the
    most common alpha must be the right one for diffusers to be a reference.
    """
    if name.endswith(ATTENTION) or component == "text_encoder":
        return 2.0
    return {2: 1.0, 4: 3.0}[rank]


def kohya_name(component: str, name: str) -> str:
    if component == "unet":
        return "lora_unet_" + name.replace(".", "_")
    return "lora_te_text_model_" + name.replace(".", "_")


def kohya_dict(pairs, names=kohya_name) -> dict[str, np.ndarray]:
    out = {}
    for (component, name), (down, up, rank) in pairs.items():
        key = names(component, name)
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = np.asarray(kohya_alpha(component, name, rank), np.float32)
    return out


def save(path, arrays, metadata=None):
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, str(path), metadata)
    return path


def peft_layers(pairs, component: str) -> dict[str, torch.Tensor]:
    """diffusers' `save_lora_weights` input: module names (the text encoder's with `text_model.`) -> lora_A / B."""
    out = {}
    for (c, name), (down, up, _) in pairs.items():
        if c == component:
            name = name if c == "unet" else f"text_model.{name}"
            out[f"{name}.lora_A.weight"] = torch.from_numpy(down)
            out[f"{name}.lora_B.weight"] = torch.from_numpy(up)
    return out


def peft_metadata(pairs, component: str) -> dict:
    """A LoraConfig as diffusers stores it: rank 4 and alpha 6, 3x3 convolutions rank 2, the ff layers alpha 2."""
    names = [name for (c, name) in pairs if c == component]
    convs = {name: 2 for (c, name), (_, _, rank) in pairs.items() if c == component and rank == 2}
    alphas = {name: 2.0 for name in names if ".ff." in name or ".mlp." in name}
    return {"r": 4, "lora_alpha": 6.0, "rank_pattern": convs, "alpha_pattern": alphas, "target_modules": names}


def write_peft(folder, pairs, name: str, metadata: bool):
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        str(folder),
        unet_lora_layers=peft_layers(pairs, "unet"),
        text_encoder_lora_layers=peft_layers(pairs, "text_encoder"),
        unet_lora_adapter_metadata=peft_metadata(pairs, "unet") if metadata else None,
        text_encoder_lora_adapter_metadata=peft_metadata(pairs, "text_encoder") if metadata else None,
        weight_name=name,
        safe_serialization=True,
    )
    return folder / name


# --------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny diffusers reference runs up to 50x slower with two torch threads on a busy two-core machine (its
    threads wait on each other); one thread is as fast as the models are small."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_device():
    """The sharding of the twin pipelines' weights (one device), so that unit tests reuse the additions compiled."""
    return parallel.replicated(parallel.batch_mesh(jax.devices()[:1]))


def sd_jax_twin(config, reference):
    """An sd_jax pipeline on the diffusers pipeline's weights (converted in memory, as `sd_jax.load` converts a
    folder), on one device: the sharding of LoRA'd weights is tested on eight below."""
    from sd_jax.convert.params import clip_state_dict_for_flax, state_from_torch
    from sd_jax.pipeline import StableDiffusionPipeline

    states = {}
    for component, (_, abstract) in abstract_components(config).items():
        weights = {k: v.numpy() for k, v in getattr(reference, component).state_dict().items()}
        if component == "text_encoder":
            weights = clip_state_dict_for_flax(weights)
        states[component] = state_from_torch(abstract, weights, component=component)
    return StableDiffusionPipeline(config, states, reference.tokenizer, mesh=one_device().mesh)


@pytest.fixture(scope="module", params=["sd1", "sd2_v"])
def model(request, tmp_path_factory):
    """The tiny model in diffusers and in sd_jax, LoRA files for it, and the base images of both."""
    kind = request.param
    folder = tmp_path_factory.mktemp(f"lora_{kind}")
    config = tiny_config(kind)
    reference = diffusers_pipeline(config)
    pipe = sd_jax_twin(config, reference)
    files = {
        "kohya": save(folder / "kohya.safetensors", kohya_dict(random_pairs(config, 1, gain=0.8))),
        "peft": write_peft(folder, random_pairs(config, 2, gain=0.3), "peft.safetensors", metadata=True),
        "peft_plain": write_peft(folder, random_pairs(config, 3, gain=0.5), "plain.safetensors", metadata=False),
    }
    latents = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    base = {"ours": sd_jax_image(pipe, latents), "theirs": diffusers_image(reference, latents)}
    return dict(kind=kind, reference=reference, pipe=pipe, files=files, latents=latents, base=base)


def diffusers_image(reference, latents) -> np.ndarray:
    with torch.no_grad():
        images = reference(
            PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=STEPS,
            latents=torch.from_numpy(latents),
            output_type="np",
            **RUN,
        ).images
    return (images[0] * 255).round().astype(np.uint8)


def sd_jax_image(pipe, latents) -> np.ndarray:
    return np.asarray(pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, latents=latents, **RUN)[0])


def diffusers_fused(reference, path, te_weight: float, unet_weight: float):
    """A copy of the diffusers pipeline with the LoRA loaded, fused at the two weights and unloaded."""
    fused = copy.deepcopy(reference)
    fused.load_lora_weights(str(path.parent), weight_name=path.name)
    fused.fuse_lora(components=["unet"], lora_scale=unet_weight)
    fused.fuse_lora(components=["text_encoder"], lora_scale=te_weight)
    fused.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    return fused


def assert_weights_match(ours: dict, fused, base: dict) -> None:
    """Every weight of sd_jax's states equals diffusers' fused one to float32 rounding, and the LoRA changed many."""
    changed = 0
    worst = 0.0
    for component in ("unet", "text_encoder"):
        theirs = {k.removeprefix("text_model."): v for k, v in getattr(fused, component).state_dict().items()}
        before = state_to_torch(base[component])
        for name, value in state_to_torch(ours[component]).items():
            expected = theirs[name].numpy()
            scale = float(np.abs(expected).max())
            error = float(np.abs(value - expected).max()) / scale
            worst = max(worst, error)
            assert error <= 1e-5, f"{component} {name}: relative error {error:.2e}"
            changed += bool(np.abs(value - before[name]).max() > 1e-3 * scale)
    print(f"fused weights: worst relative error {worst:.2e}, {changed} weights changed")
    assert changed >= 40


# ---------------------------------------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_images_and_weights_match_diffusers(model, fmt):
    pipe, reference = model["pipe"], model["reference"]
    base = pipe.states
    lora = read_lora(model["files"][fmt])
    assert lora.format == fmt and lora.components() == {"unet", "text_encoder"}
    fused = diffusers_fused(reference, model["files"][fmt], TE_WEIGHT, UNET_WEIGHT)
    ours = apply_loras(base, [ActiveLoRA(lora, TE_WEIGHT, UNET_WEIGHT)])
    assert ours["vae"] is base["vae"]
    assert_weights_match(ours, fused, base)

    compiled = pipe.program.compiled_count()
    pipe.states = ours
    try:
        image = sd_jax_image(pipe, model["latents"])
    finally:
        pipe.states = base
    expected = diffusers_image(fused, model["latents"])
    diff = np.abs(image.astype(int) - expected.astype(int))
    change = np.abs(image.astype(int) - model["base"]["ours"].astype(int))
    print(f"{model['kind']} {fmt}: max pixel difference to diffusers {diff.max()} / 255 (base images: ", end="")
    print(f"{base_difference(model)}); the LoRA moves pixels by up to {change.max()}, mean {change.mean():.1f}")
    assert diff.max() <= 2
    assert change.max() > 60 and change.mean() > 8, "the LoRA must visibly change the image"
    assert expected.std() > 10
    assert pipe.program.compiled_count() == compiled


def base_difference(model) -> int:
    return int(np.abs(model["base"]["ours"].astype(int) - model["base"]["theirs"].astype(int)).max())


def test_peft_file_without_alphas_has_scale_one(model):
    lora = read_lora(model["files"]["peft_plain"])
    assert {module.alpha for module in lora.modules} == {None}
    fused = diffusers_fused(model["reference"], model["files"]["peft_plain"], 1.2, 0.5)
    base = model["pipe"].states
    assert_weights_match(apply_loras(base, [(lora, 1.2, 0.5)]), fused, base)


def test_weight_changes_do_not_recompile_and_the_base_comes_back(model):
    pipe = model["pipe"]
    base = pipe.states
    lora = read_lora(model["files"]["kohya"])
    sd_jax_image(pipe, model["latents"])
    compiled = pipe.program.compiled_count()
    images = []
    try:
        for weight in (0.5, 1.0):
            pipe.states = apply_loras(base, [(lora, weight)])
            images.append(sd_jax_image(pipe, model["latents"]))
        assert len(lora.deltas) == len(lora.modules), "up @ down is computed once per module"
        restored = apply_loras(base, [])
        assert all(restored[c] is base[c] for c in base)
        pipe.states = restored
        images.append(sd_jax_image(pipe, model["latents"]))
    finally:
        pipe.states = base
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 10
    np.testing.assert_array_equal(images[2], model["base"]["ours"])
    assert pipe.program.compiled_count() == compiled


# --------------------------------------------------------------------------------------------------- unit behaviour


@pytest.fixture(scope="module")
def sd1_states():
    """Random float32 weights of the tiny SD 1.x model (no diffusers, no pipeline)."""
    return jax.device_put(random_components(tiny_config("sd1"), seed=0), one_device())


def test_base_states_are_returned_and_never_modified(sd1_states, tmp_path):
    pairs = random_pairs(tiny_config("sd1"), 4, gain=0.5)
    lora = read_lora(save(tmp_path / "a.safetensors", kohya_dict(pairs)))
    with pytest.raises(ValueError, match="finite"):
        apply_loras(sd1_states, [(lora, float("nan"))])
    with pytest.raises(TypeError):
        apply_loras(sd1_states, ["a.safetensors"])
    before = {c: state_to_torch(s) for c, s in sd1_states.items()}
    empty = apply_loras(sd1_states, [])
    assert empty.keys() == sd1_states.keys() and all(empty[c] is sd1_states[c] for c in sd1_states)
    unet_only = apply_loras(sd1_states, [ActiveLoRA(lora, te_weight=0.0, unet_weight=1.0)])
    assert unet_only["text_encoder"] is sd1_states["text_encoder"] and unet_only["vae"] is sd1_states["vae"]
    assert unet_only["unet"] is not sd1_states["unet"]
    for component, state in sd1_states.items():
        for name, value in state_to_torch(state).items():
            np.testing.assert_array_equal(value, before[component][name])


# The tiny SD 1.x U-Net (two levels, one resnet per down level) in the original LDM names, written out by hand.
_TINY_ORIGINAL_BLOCKS = {
    "down_blocks.0.resnets.0": "input_blocks.1.0",
    "down_blocks.0.attentions.0": "input_blocks.1.1",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
    "down_blocks.1.resnets.0": "input_blocks.3.0",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0",
    "up_blocks.0.resnets.1": "output_blocks.1.0",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.1.1.conv",
    "up_blocks.1.resnets.0": "output_blocks.2.0",
    "up_blocks.1.attentions.0": "output_blocks.2.1",
    "up_blocks.1.resnets.1": "output_blocks.3.0",
    "up_blocks.1.attentions.1": "output_blocks.3.1",
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
}
_RESNET_LAYERS = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def original_sd_name(name: str) -> str:
    """A diffusers module name of the tiny SD 1.x U-Net in the original single-file naming."""
    for block, original in _TINY_ORIGINAL_BLOCKS.items():
        if name == block or name.startswith(block + "."):
            rest = name[len(block) :].lstrip(".")
            rest = _RESNET_LAYERS.get(rest, rest) if ".resnets." in f".{block}." else rest
            return f"{original}.{rest}".rstrip(".")
    raise KeyError(name)


def test_every_naming_and_container_gives_the_same_weights(sd1_states, tmp_path):
    """kohya with diffusers names, kohya with the original-SD names, PEFT without prefixes (`base_model.model.`),
    older diffusers names and a pickled .pt: one LoRA, the same result to the bit."""
    pairs = random_pairs(tiny_config("sd1"), 5, gain=0.5)

    def compvis(component, name):
        if component != "unet":
            return kohya_name(component, name)
        return "lora_unet_" + original_sd_name(name).replace(".", "_")

    def old_diffusers(pairs):
        short = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
        out = {}
        for (component, name), (down, up, rank) in pairs.items():
            prefix = "unet." if component == "unet" else "text_encoder.text_model."
            attention, _, projection = name.removesuffix(".0").rpartition(".")
            if component == "unet" and projection in ("to_q", "to_k", "to_v", "to_out"):
                key = f"{prefix}{attention}.processor.{projection}_lora"  # attention processors
            elif projection in short:
                key = f"{prefix}{attention}.{short[projection]}_lora"
            elif ".mlp." in name:
                key = f"{prefix}{name}.lora_linear_layer"
            else:
                key = f"{prefix}{name}.lora"
            out[f"{key}.down.weight"], out[f"{key}.up.weight"] = down, up
            out[f"{prefix}{name}.alpha"] = np.asarray(kohya_alpha(component, name, rank), np.float32)
        return out

    def peft_bare(pairs):
        out = {}
        for (component, name), (down, up, rank) in pairs.items():
            key = f"base_model.model.{name}" if component == "unet" else f"text_encoder.text_model.{name}"
            out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = down, up
            out[f"{key}.alpha"] = np.asarray(kohya_alpha(component, name, rank), np.float32)
        return out

    files = {
        "kohya": save(tmp_path / "kohya.safetensors", kohya_dict(pairs)),
        "compvis": save(tmp_path / "compvis.safetensors", kohya_dict(pairs, compvis)),
        "old": save(tmp_path / "old.safetensors", old_diffusers(pairs)),
        "peft": save(tmp_path / "peft.safetensors", peft_bare(pairs)),
    }
    torch.save({k: torch.from_numpy(v) for k, v in kohya_dict(pairs).items()}, tmp_path / "kohya.pt")
    files["pickle"] = tmp_path / "kohya.pt"
    results = {}
    for name, path in files.items():
        lora = read_lora(path)
        assert len(lora.modules) == len(pairs), name
        results[name] = state_to_torch(apply_loras(sd1_states, [(lora, 0.8)])["unet"])
        results[name + "_te"] = state_to_torch(apply_loras(sd1_states, [(lora, 0.8)])["text_encoder"])
    assert read_lora(files["old"]).format == "diffusers" and read_lora(files["peft"]).format == "peft"
    for name in files:
        for key, value in results["kohya"].items():
            np.testing.assert_array_equal(results[name][key], value, err_msg=f"{name}: {key}")
        for key, value in results["kohya_te"].items():
            np.testing.assert_array_equal(results[name + "_te"][key], value, err_msg=f"{name} te: {key}")


def test_half_precision_weights_keep_dtype_and_sharding(sd1_states, tmp_path):
    config = tiny_config("sd1")
    mesh = parallel.batch_mesh()
    assert mesh.size == 8, "tests/conftest.py forces 8 CPU devices"
    replicated = parallel.replicated(mesh)
    flat = nnx.to_flat_state(sd1_states["unet"])
    bfloat16 = [
        (p, v.replace(jax.device_put(np.asarray(v.get_value()).astype(jnp.bfloat16), replicated))) for p, v in flat
    ]
    states = {"unet": nnx.from_flat_state(bfloat16)}
    # A few modules of three kernel shapes: three additions to compile for bfloat16 on eight devices.
    chosen = ("attn1.to_q", "attn2.to_v", "down_blocks.0.resnets.0.conv1", "mid_block.resnets.0.conv1")
    pairs = {k: v for k, v in random_pairs(config, 6, gain=0.5).items() if k[1].endswith(chosen)}
    lora = read_lora(save(tmp_path / "a.safetensors", kohya_dict(pairs)))
    out = apply_loras(states, [(lora, 0.6), (lora, 0.3)])
    before = dict(nnx.to_flat_state(states["unet"]))
    checked = 0
    for path, variable in nnx.to_flat_state(out["unet"]):
        new, old = variable.get_value(), before[path].get_value()
        assert new.dtype == jnp.bfloat16 and new.sharding == old.sharding
        module = ".".join(map(str, path[:-1]))
        if path[-1] == "kernel" and ("unet", module) in pairs:
            delta = module_delta(next(m for m in lora.modules if m.name == module.replace(".", "_")), old.shape)
            total = np.float32(0.6) * delta + np.float32(0.3) * delta
            expected = (np.asarray(old).astype(np.float32) + total).astype(jnp.bfloat16)
            np.testing.assert_array_equal(np.asarray(new), expected)
            checked += 1
    assert checked == len(pairs) >= 8


# ------------------------------------------------------------------------------------------------------ bad files


def _kohya_file(path, extra=None, drop=()):
    arrays = kohya_dict(random_pairs(tiny_config("sd1"), 7, gain=0.5))
    arrays = {k: v for k, v in arrays.items() if not any(d in k for d in drop)}
    arrays.update(extra or {})
    return save(path, arrays)


def _truncated(path):
    _kohya_file(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _one(shape):
    return np.ones(shape, np.float32)


BAD_FILES = {
    "missing": (lambda p: p, "no such file"),
    "extension": (lambda p: (p.with_suffix(".txt").write_text("x"), p.with_suffix(".txt"))[1], "extension"),
    "corrupt": (_truncated, "corrupt"),
    "corrupt_pickle": (
        lambda p: (p.with_suffix(".pt").write_bytes(b"PK\x03\x04 not a zip"), p.with_suffix(".pt"))[1],
        "corrupt",
    ),
    "no_lora": (lambda p: save(p, {"model.diffusion_model.out.2.weight": _one((4, 4))}), "no LoRA weights"),
    "stray_key": (lambda p: _kohya_file(p, {"model.diffusion_model.out.2.weight": _one((4,))}), "not a LoRA weight"),
    "loha": (lambda p: _kohya_file(p, {"lora_unet_conv_in.hada_w1_a": _one((4, 2))}), "LoHa"),
    "lokr": (lambda p: _kohya_file(p, {"lora_unet_conv_in.lokr_w1": _one((4, 2))}), "LoKr"),
    "tucker": (lambda p: _kohya_file(p, {"lora_unet_conv_in.lora_mid.weight": _one((2, 2, 3, 3))}), "Tucker"),
    "dora": (lambda p: _kohya_file(p, {"lora_unet_conv_in.dora_scale": _one((1, 32))}), "DoRA"),
    "sdxl": (
        lambda p: _kohya_file(p, {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": _one((4, 8))}),
        "SDXL",
    ),
    "no_up": (lambda p: _kohya_file(p, drop=["lora_unet_conv_in.lora_up"]), "no up"),
    "rank": (
        lambda p: _kohya_file(p, {"lora_unet_conv_in.lora_up.weight": _one((32, 3, 1, 1))}),
        "not a low-rank pair",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_one_line_naming_the_file(case, tmp_path):
    make, words = BAD_FILES[case]
    path = make(tmp_path / "bad.safetensors")
    with pytest.raises(LoRAError, match=words) as caught:
        read_lora(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message, message


@pytest.mark.parametrize(
    "case, words",
    [("unknown_module", "names no layer"), ("sd2_on_sd1", "another base model"), ("both_names", "both update")],
)
def test_lora_for_another_model_is_refused_before_sampling(case, words, tmp_path):
    sd1 = {c: state for c, (_, state) in abstract_components(tiny_config("sd1")).items()}
    if case == "unknown_module":
        path = _kohya_file(
            tmp_path / "a.safetensors",
            kohya_dict({("unet", "down_blocks.7.resnets.0.conv1"): (_one((2, 32, 3, 3)), _one((32, 2, 1, 1)), 2)}),
        )
    elif case == "sd2_on_sd1":
        path = save(tmp_path / "a.safetensors", kohya_dict(random_pairs(tiny_config("sd2_v"), 8, gain=0.5)))
    else:
        pairs = random_pairs(tiny_config("sd1"), 9, gain=0.5)
        arrays = kohya_dict(pairs)
        down, up = arrays["lora_unet_conv_in.lora_down.weight"], arrays["lora_unet_conv_in.lora_up.weight"]
        arrays.update(
            {
                "lora_unet_input_blocks_0_0.lora_down.weight": down.copy(),
                "lora_unet_input_blocks_0_0.lora_up.weight": up.copy(),
            }
        )
        path = save(tmp_path / "a.safetensors", arrays)
    lora = read_lora(path)
    with pytest.raises(LoRAError, match=words) as caught:
        check_lora(lora, sd1)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(LoRAError):
        apply_loras(random_components(tiny_config("sd1")), [lora])


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3), "payload": _RunsCode(marker)}, path)
    with pytest.raises(LoRAError, match="refusing to load") as caught:
        read_lora(path)
    assert str(path) in str(caught.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------------- hash


def test_short_hash_is_automatic1111s(tmp_path):
    arrays = kohya_dict(random_pairs(tiny_config("sd1"), 10, gain=0.5))
    one = save(tmp_path / "one.safetensors", arrays, {"ss_output_name": "one"})
    two = save(tmp_path / "two.safetensors", arrays, {"ss_output_name": "a much longer name than before"})
    data = one.read_bytes()
    header = int.from_bytes(data[:8], "little")
    # The "addnet" hash: sha256 of everything after the header, so metadata edits keep it.
    assert short_hash(one) == hashlib.sha256(data[8 + header :]).hexdigest()[:12] == short_hash(two)
    assert short_hash(one) != hashlib.sha256(data).hexdigest()[:12]
    stored = save(tmp_path / "stored.safetensors", arrays, {"sshs_model_hash": "0123456789abcdef" * 4})
    assert short_hash(stored) == "0123456789ab"
    pickled = tmp_path / "one.pt"
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, pickled)
    assert short_hash(pickled) == hashlib.sha256(pickled.read_bytes()).hexdigest()[:12]
    with pytest.raises(LoRAError, match="cannot read"):
        short_hash(tmp_path / "nothing.safetensors")


def test_read_lora_names_metadata_and_bundled_embeddings(tmp_path):
    arrays = kohya_dict(random_pairs(tiny_config("sd1"), 11, gain=0.5))
    arrays["bundle_emb.my-style.string_to_param.*"] = _one((2, 32))
    path = save(tmp_path / "My Style v2.safetensors", arrays, {"ss_network_dim": "4"})
    lora = read_lora(path)
    assert lora.name == "My Style v2" and lora.path == path and lora.format == "kohya"
    assert lora.metadata["ss_network_dim"] == "4" and lora.components() == {"text_encoder", "unet"}
    assert list(lora.ignored) == ["bundle_emb.my-style.string_to_param.*"]
    assert path.suffix in LORA_SUFFIXES
