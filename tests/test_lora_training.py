"""LoRA training: kohya's targets and initialisation, a run on the tiny model (base frozen, loss down, resume), the
written file loaded and fused by diffusers against our merged weights, and bad options."""

import json
import logging
import shutil
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from sd_jax.convert.params import flax_to_torch_layout, state_to_flat
from sd_jax.lora import LoRAError, apply_loras, read_lora
from sd_jax.models import abstract_components
from sd_jax.training import Trainer, TrainOptions, lora
from tests.test_convert import ROOT
from tests.test_training import _env, write_images
from tests.tiny_models import save_diffusers_pipeline, tiny_config

RANK, ALPHA, STEPS = 4, 2.0, 30


def _shapes(component: str) -> dict:
    from flax import nnx

    from sd_jax.convert.params import path_to_name

    _, abstract = abstract_components(tiny_config("sd1"))[component]
    return {path_to_name(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(abstract)}


# ---------------------------------------------------------------------------------------------------------------
# Targets, initialisation, layout


def test_targets_are_kohyas_and_step_zero_is_the_base_model():
    unet, text = _shapes("unet"), _shapes("text_encoder")
    targets = lora.lora_targets("unet", unet)
    # kohya wraps every Linear and 1x1 conv of each Transformer2DModel: 4 containers in the tiny U-Net, 12 each.
    block = "down_blocks.0.attentions.0"
    ours = {t[len(block) + 1 :] for t in targets if t.startswith(block)}
    attn = {f"transformer_blocks.0.attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    ff = {"transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"}
    assert ours == {"proj_in", "proj_out"} | attn | ff
    assert len(targets) == 48
    te = lora.lora_targets("text_encoder", text)
    assert te[:6] == [f"encoder.layers.0.{m}" for m in ("mlp.fc1", "mlp.fc2")] + [
        f"encoder.layers.0.self_attn.{p}_proj" for p in ("k", "out", "q", "v")
    ]
    assert len(te) == 12
    with pytest.raises(LoRAError, match="covers"):
        lora.lora_targets("vae", unet)

    params = lora.init_lora(unet, targets, RANK, seed=(0, 0))
    down = params[f"{block}.proj_in.lora_down"]
    assert down.shape == (1, 1, 32, RANK) and params[f"{block}.proj_in.lora_up"].shape == (1, 1, RANK, 32)
    ff_down = params[f"{block}.transformer_blocks.0.ff.net.2.lora_down"]
    assert ff_down.shape == (128, RANK)
    # PyTorch's Linear init (kaiming-uniform, a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1 / np.sqrt(128)
    assert bound * 0.9 < np.abs(ff_down).max() <= bound
    assert all(not np.any(v) for k, v in params.items() if k.endswith("lora_up"))
    # Step 0: every kernel bitwise the base kernel.
    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in unet.items()}
    merged = lora.apply_lora(base, params, scale=ALPHA / RANK)
    assert merged.keys() == base.keys()
    for k in base:
        np.testing.assert_array_equal(merged[k], base[k], err_msg=k)


def test_kohya_names_and_layout():
    rng = np.random.default_rng(1)
    linear = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    conv = "mid_block.attentions.0.proj_in"
    params = {
        "unet": {
            f"{linear}.lora_down": rng.standard_normal((32, 4), np.float32),
            f"{linear}.lora_up": rng.standard_normal((4, 48), np.float32),
            f"{conv}.lora_down": rng.standard_normal((1, 1, 64, 4), np.float32),
            f"{conv}.lora_up": rng.standard_normal((1, 1, 4, 64), np.float32),
        },
        "text_encoder": {
            "encoder.layers.1.mlp.fc2.lora_down": rng.standard_normal((64, 4), np.float32),
            "encoder.layers.1.mlp.fc2.lora_up": rng.standard_normal((4, 32), np.float32),
        },
    }
    tensors = lora.kohya_state_dict(params, alpha=ALPHA)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    p = "lora_unet_mid_block_attentions_0_proj_in"
    fc2 = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    assert {k: v.shape for k, v in tensors.items()} == {
        f"{p}.lora_down.weight": (4, 64, 1, 1),
        f"{p}.lora_up.weight": (64, 4, 1, 1),
        f"{p}.alpha": (),
        f"{q}.lora_down.weight": (4, 32),
        f"{q}.lora_up.weight": (48, 4),
        f"{q}.alpha": (),
        f"{fc2}.lora_down.weight": (4, 64),
        f"{fc2}.lora_up.weight": (32, 4),
        f"{fc2}.alpha": (),
    }
    assert float(tensors[f"{q}.alpha"]) == ALPHA
    # kohya's merge, W_torch + scale * up @ down, is the PyTorch layout of our W + scale * down @ up.
    for name, key in ((linear, q), (conv, p)):
        down, up = params["unet"][f"{name}.lora_down"], params["unet"][f"{name}.lora_up"]
        shape = (*down.shape[:-1], up.shape[-1])
        ours = flax_to_torch_layout("kernel", np.asarray(lora.lora_delta(down, up, 0.5, shape)))
        t_up, t_down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
        theirs = 0.5 * (t_up.reshape(t_up.shape[0], -1) @ t_down.reshape(RANK, -1))
        np.testing.assert_allclose(ours.reshape(theirs.shape), theirs, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# A run on the tiny model (one compilation for the whole file)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A diffusers pipeline saved as the base, then 30 LoRA steps on it (U-Net and text encoder, EMA), checkpoints
    at 15 and 30; then the checkpoint at 30 and the file removed and the same Trainer run again (a resume from 15)."""
    root = tmp_path_factory.mktemp("lora")
    pipe = save_diffusers_pipeline(tiny_config("sd1"), root / "base")
    data = write_images(root / "images")
    options = TrainOptions(
        output_dir=str(root / "run"),
        data=str(data),
        model=str(root / "base"),
        resolution=32,
        batch_size=8,
        max_steps=STEPS,
        learning_rate=1e-2,
        save_every=15,
        log_every=1,
        ema_decay=0.9,
        lora_rank=RANK,
        lora_alpha=ALPHA,
        lora_text_encoder=True,
    )
    trainer = Trainer(options, show_progress=False, devices=jax.devices()[:1])
    start = {n: state_to_flat(s) for n, s in trainer.states.items()}
    state = trainer.run()
    out = root / "run"
    whole = load_file(str(out / "lora.safetensors"))
    shutil.rmtree(out / "checkpoints" / str(STEPS))
    (out / "lora.safetensors").unlink()
    resumed = trainer.run()
    return {"pipe": pipe, "trainer": trainer, "start": start, "state": state, "resumed": resumed, "whole": whole}


def test_lora_trains_only_the_lora_and_resumes(lora_run):
    trainer, state, out = lora_run["trainer"], lora_run["state"], lora_run["trainer"].out
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))  # the resumed run's lines replace none twice
    losses = [r["loss"] for r in history]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"LoRA over-fit: loss {first:.3f} -> {last:.3f}")
    assert last < 0.85 * first
    # The state, the EMA and the optimizer hold LoRA matrices only; every up matrix has moved from zero.
    for tree in (state.params, state.ema):
        assert set(tree) == {"unet", "text_encoder"}
        for flat in tree.values():
            assert all(k.endswith((".lora_down", ".lora_up")) for k in flat)
            assert all(np.any(np.asarray(v)) for v in flat.values())
    lora_size = sum(v.size for v in jax.tree.leaves(state.params))
    full_size = sum(v.size for name in ("unet", "text_encoder") for v in lora_run["start"][name].values())
    assert sum(leaf.size for leaf in jax.tree.leaves(state.opt_state)) < 3 * lora_size + 10
    assert lora_size < 0.02 * full_size
    # The base weights are bitwise those the run started from.
    for name, flat in lora_run["start"].items():
        now = state_to_flat(trainer.states[name])
        assert all(np.array_equal(now[k], flat[k]) for k in flat), name
    assert not (out / "model").exists()
    # Both checkpoints together (LoRA, EMA, Adam moments, orbax's metadata) are smaller than one float32 copy of
    # the weights; the resume from step 15 ends bitwise where the whole run did.
    checkpoint_bytes = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file())
    print(f"checkpoints {checkpoint_bytes / 1e6:.1f} MB, LoRA {lora_size} of {full_size} parameters")
    assert checkpoint_bytes < 4 * full_size
    resumed = load_file(str(out / "lora.safetensors"))
    assert resumed.keys() == lora_run["whole"].keys()
    for k in resumed:
        np.testing.assert_array_equal(resumed[k], lora_run["whole"][k], err_msg=k)
    with safe_open(str(out / "lora.safetensors"), "np") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == str(RANK) and float(metadata["ss_network_alpha"]) == ALPHA
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_steps"] == str(STEPS)


def _diffusers_loads_and_fuses(pipe, file):
    """Loads the file into the diffusers pipeline and fuses it; returns the LoRA'd module names per component and
    every warning or log record diffusers and peft emitted."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(file))
            wrapped = {
                name: {m for m, module in getattr(pipe, name).named_modules() if hasattr(module, "lora_A")}
                for name in ("unet", "text_encoder")
            }
            pipe.fuse_lora(lora_scale=1.0)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    return wrapped, messages


def test_diffusers_fuses_the_same_weights(lora_run):
    pipe, trainer, state = lora_run["pipe"], lora_run["trainer"], lora_run["state"]
    base = {name: dict(getattr(pipe, name).state_dict()) for name in ("unet", "text_encoder")}
    base = {name: {k: v.detach().clone() for k, v in sd.items()} for name, sd in base.items()}
    wrapped, messages = _diffusers_loads_and_fuses(pipe, trainer.out / "lora.safetensors")
    assert not [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()], messages
    ema = jax.tree.map(np.asarray, jax.device_get(state.ema))  # the file holds the EMA's LoRA
    worst = {}
    for name in ("unet", "text_encoder"):
        modules = lora.lora_modules(ema[name])
        # transformers 4 nests CLIP's layers under `text_model`, transformers 5 does not.
        prefix = "text_model." if any(m.startswith("text_model.") for m in wrapped[name]) else ""
        assert wrapped[name] == {prefix + m for m in modules}, f"{name}: modules diffusers did not pick up"
        merged = lora.apply_lora(lora_run["start"][name], ema[name], ALPHA / RANK)
        fused = dict(getattr(pipe, name).named_modules())
        worst[name] = 0.0
        for module in modules:
            ours = flax_to_torch_layout("kernel", np.asarray(merged[f"{module}.kernel"]))
            layer = fused[prefix + module]
            theirs = getattr(layer, "base_layer", layer).weight.detach().numpy()  # peft keeps the wrapper
            before = base[name][f"{prefix}{module}.weight"].numpy()
            scale = np.abs(theirs).max()
            # The LoRA moved every weight far beyond the tolerance: the comparison would see a wrong alpha or layout.
            assert np.abs(theirs - before).max() > 1e-3 * scale, f"{module}: the fused weight hardly changed"
            relative = np.abs(ours - theirs).max() / scale
            worst[name] = max(worst[name], float(relative))
    print(f"fused by diffusers vs ours, max relative difference: {worst}")
    assert max(worst.values()) < 1e-5


def test_sd_jax_reads_the_trained_file_back(lora_run):
    trainer, ema = lora_run["trainer"], jax.device_get(lora_run["state"].ema)
    applied = apply_loras(trainer.states, [read_lora(trainer.out / "lora.safetensors")])
    for name in ("unet", "text_encoder"):
        merged = lora.apply_lora(lora_run["start"][name], ema[name], ALPHA / RANK)
        ours = state_to_flat(applied[name])
        for module in lora.lora_modules(ema[name]):
            key = f"{module}.kernel"
            np.testing.assert_allclose(ours[key], merged[key], rtol=1e-6, atol=1e-6, err_msg=key)


# ---------------------------------------------------------------------------------------------------------------
# Bad options


def test_bad_lora_options_are_one_line_errors(tmp_path, lora_run):
    data = write_images(tmp_path / "data", n=2)
    base = dict(output_dir=str(tmp_path / "out"), data=str(data), config="tiny", resolution=32)
    cases = {
        "needs --component=unet": dict(lora_rank=4, component="vae"),
        "with --lora_rank use --lora_text_encoder": dict(lora_rank=4, train_text_encoder=True),
        "need --lora_rank": dict(lora_text_encoder=True),
        "--lora_rank must be a positive integer": dict(lora_rank=0),
        "--lora_alpha must be positive": dict(lora_rank=4, lora_alpha=-1.0),
    }
    for message, kw in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            TrainOptions(**base, **kw).validate()
        assert "\n" not in str(error.value)
    assert TrainOptions(**base, lora_rank=8).lora_scale == 1.0
    assert TrainOptions(**base, lora_rank=8, lora_alpha=4.0).lora_scale == 0.5
    assert TrainOptions(**base, lora_rank=3, lora_alpha=0.3).lora_network_alpha == 0.3
    # Resuming with another rank is refused before anything loads.
    previous = json.loads((lora_run["trainer"].out / "run.json").read_text())
    with pytest.raises(ValueError, match="--lora_rank=4 \\(now 8\\)"):
        Trainer(TrainOptions(**{**previous, "sample_prompts": (), "lora_rank": 8}), show_progress=False)
    # The flags reach the options: the script stops on the same one-line error.
    flags = [f"--{k}={v}" for k, v in base.items()] + ["--lora_rank=4", "--component=vae"]
    result = subprocess.run(
        [sys.executable, "scripts/train.py", *flags],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--lora_rank needs --component=unet" in errors[0], result.stderr[-2000:]
