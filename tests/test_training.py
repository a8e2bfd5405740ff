"""Training: the loss against diffusers' noise, targets and U-Net; over-fitting; resume after SIGKILL; devices."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

import sd_jax
from sd_jax.config import SD_SCHEDULER
from sd_jax.convert.params import state_to_flat, state_to_torch
from sd_jax.models import abstract_components, random_components
from sd_jax.sampling.schedules import alphas_cumprod
from sd_jax.training import Trainer, TrainOptions
from sd_jax.training import loss as losses
from tests.test_convert import ROOT
from tests.tiny_models import tiny_config

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (240, 240, 240)]


def write_images(folder, n=4, size=32, captions=True):
    """n flat-background images with a square, each with a caption file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.zeros((size, size, 3), np.uint8)
        pixels[:] = COLOURS[i % 4]
        pixels[size // 4 : size // 2 + size // 4, size // 4 : size // 2 + size // 4] = COLOURS[(i + 1) % 4]
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        if captions:
            (folder / f"{i:03d}.txt").write_text(f"picture number {i}")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data") / "images")


def options(tmp_path, data, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        data=str(data),
        config="tiny",
        resolution=32,
        batch_size=8,
        max_steps=4,
        learning_rate=1e-3,
        save_every=100,
        log_every=1,
    )
    return TrainOptions(**(base | kw))


# ---------------------------------------------------------------------------------------------------------------
# The loss against diffusers


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noise_targets_and_loss_match_diffusers(prediction_type):
    """add_noise, the targets, the min-SNR weights and the U-Net loss against DDPMScheduler, compute_snr (as
    diffusers' training scripts weigh it) and the same U-Net in PyTorch, on the same weights and draws."""
    from diffusers.training_utils import compute_snr

    config = tiny_config("sd1")
    scheduler_config = {**SD_SCHEDULER, "prediction_type": prediction_type}
    acp = jnp.asarray(alphas_cumprod(scheduler_config), jnp.float32)
    settings = losses.DiffusionSettings(prediction_type=prediction_type, snr_gamma=5.0, noise_offset=0.1)
    latents = jax.random.normal(jax.random.key(1), (4, 8, 8, 4))
    noisy, timesteps, target, weights = losses.diffusion_inputs(latents, jax.random.key(2), acp, settings)

    scheduler = diffusers.DDPMScheduler.from_config(scheduler_config)
    t = torch.from_numpy(np.array(timesteps)).long()
    # The drawn noise, recovered from x_t (exactly what add_noise mixed in).
    a = np.sqrt(np.asarray(acp)[np.asarray(timesteps)])[:, None, None, None]
    noise = (np.asarray(noisy) - a * np.asarray(latents)) / np.sqrt(1 - a**2)
    x0_t = torch.from_numpy(np.asarray(latents).transpose(0, 3, 1, 2).copy())
    noise_t = torch.from_numpy(noise.transpose(0, 3, 1, 2).astype(np.float32))
    ref_noisy = scheduler.add_noise(x0_t, noise_t, t).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(noisy), ref_noisy, rtol=1e-5, atol=1e-5)
    ref_target = noise_t if prediction_type == "epsilon" else scheduler.get_velocity(x0_t, noise_t, t)
    np.testing.assert_allclose(np.asarray(target), ref_target.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    snr = compute_snr(scheduler, t)
    ref_weights = torch.stack([snr, 5.0 * torch.ones_like(t, dtype=snr.dtype)], dim=1).min(dim=1)[0]
    ref_weights = ref_weights / snr if prediction_type == "epsilon" else ref_weights / (snr + 1)
    np.testing.assert_allclose(np.asarray(weights), ref_weights.numpy(), rtol=1e-5)
    # The noise offset is a per-image, per-channel constant: the recovered noise minus a unit normal field.
    assert np.asarray(noise).std() > 0.5

    # The whole loss, with the same U-Net and text encoder in PyTorch.
    states = random_components(config, seed=3)
    graphs = abstract_components(config)
    flat = {n: {k: jnp.asarray(v) for k, v in state_to_flat(s).items()} for n, s in states.items()}
    unet = losses.merge(*graphs["unet"], flat["unet"])
    text = losses.merge(*graphs["text_encoder"], flat["text_encoder"])
    moments = jnp.concatenate([latents, jnp.full_like(latents, -30.0)], axis=-1)  # std exp(-15): z = mean
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 49407, (4, 77)), jnp.int32)
    key = jax.random.key(5)
    plain = losses.DiffusionSettings(prediction_type=prediction_type, scaling_factor=0.5)
    loss, _ = losses.denoiser_loss(unet, text, None, {"moments": moments, "input_ids": ids}, key, acp, plain)
    k_latent, k_diffusion = jax.random.split(key)
    z = losses.sample_latents(moments, k_latent, plain)
    np.testing.assert_allclose(np.asarray(z), 0.5 * np.asarray(latents), rtol=1e-6, atol=1e-6)
    noisy, timesteps, target, _ = losses.diffusion_inputs(z, k_diffusion, acp, plain)

    torch_unet = diffusers.UNet2DConditionModel(**config.unet.to_dict())
    torch_unet.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state_to_torch(states["unet"]).items()})
    context = torch.from_numpy(np.asarray(text(ids)))
    with torch.no_grad():
        prediction = torch_unet(
            torch.from_numpy(np.asarray(noisy).transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(np.array(timesteps)).long(),
            context,
        ).sample
    target_t = torch.from_numpy(np.asarray(target).transpose(0, 3, 1, 2).copy())
    ref_loss = torch.nn.functional.mse_loss(prediction, target_t).item()
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)


def test_vae_loss_terms():
    """The VAE loss: L1 summed per image plus the KL of N(mean, exp(logvar)) against N(0, I), batch mean."""
    config = tiny_config("sd1")
    states = random_components(config, seed=1)
    graph, abstract = abstract_components(config)["vae"]
    vae = losses.merge(graph, abstract, {k: jnp.asarray(v) for k, v in state_to_flat(states["vae"]).items()})
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    loss, metrics = losses.vae_loss(vae, {"pixels": x}, jax.random.key(1), kl_weight=0.0)
    mean, logvar = vae.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.key(1), mean.shape)
    l1 = np.abs(np.asarray(x) - np.asarray(vae.decode(z))).sum(axis=(1, 2, 3)).mean()
    np.testing.assert_allclose(float(loss), l1, rtol=1e-5)
    kl = 0.5 * (np.asarray(mean) ** 2 + np.exp(np.asarray(logvar)) - 1 - np.asarray(logvar)).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(float(metrics["kl"]), kl.mean(), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Training runs


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_unet_overfits_and_writes_a_loadable_model(tmp_path, images):
    import sd_jax

    opts = options(
        tmp_path,
        images,
        max_steps=60,
        train_text_encoder=True,
        ema_decay=0.9,
        save_every=30,
        sample_every=60,
        sample_prompts=("picture number 1",),
        sample_steps=2,
        learning_rate=2e-3,
        warmup_steps=5,
        snr_gamma=5.0,
    )
    trainer = Trainer(opts, show_progress=False, devices=jax.devices()[:1])
    trainer.run()
    run = tmp_path / "run"
    history = _losses(run)
    assert len(history) == 60
    first, last = np.mean(history[:10]), np.mean(history[-10:])
    print(f"unet over-fit: loss {first:.3f} -> {last:.3f}")
    assert last < 0.6 * first
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["30", "60"]
    assert (run / "samples" / "step-0000060.png").is_file()
    pipe = sd_jax.load(run / "model")
    assert pipe.txt2img("picture number 1", height=32, width=32, steps=2)[0].size == (32, 32)
    # The model folder holds the EMA weights of the U-Net and the text encoder, the VAE as it was.
    saved = load_file(str(run / "model" / "unet" / "params.safetensors"))
    initial = state_to_flat(random_components(tiny_config("sd1"), seed=0)["unet"])
    assert any(not np.array_equal(saved[k], initial[k]) for k in saved)
    vae = load_file(str(run / "model" / "vae" / "params.safetensors"))
    initial_vae = state_to_flat(random_components(tiny_config("sd1"), seed=0)["vae"])
    assert all(np.array_equal(vae[k], initial_vae[k]) for k in vae)


def test_vae_overfits(tmp_path, images):
    opts = options(tmp_path, images, component="vae", max_steps=40, learning_rate=2e-3, batch_size=4)
    Trainer(opts, show_progress=False, devices=jax.devices()[:1]).run()
    history = _losses(tmp_path / "run")
    print(f"vae over-fit: loss {np.mean(history[:5]):.1f} -> {np.mean(history[-5:]):.1f}")
    assert np.mean(history[-5:]) < 0.7 * np.mean(history[:5])
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    # From scratch, the latent scale is measured on the data, not left at SD's 0.18215.
    assert config["vae"]["scaling_factor"] != 0.18215

    # The same run again with --standardize_latents resumes at its end and writes the same VAE reparametrized:
    # latent channels centred and of unit spread on the data, scale 1, and the same round trip.
    (tmp_path / "run" / "model").rename(tmp_path / "plain")
    Trainer(dataclasses.replace(opts, standardize_latents=True), show_progress=False, devices=jax.devices()[:1]).run()
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["vae"]["scaling_factor"] == 1.0
    plain, standard = (sd_jax.load(str(p)) for p in (tmp_path / "plain", tmp_path / "run" / "model"))
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(images.glob("*.png"))]
    graph, abstract = abstract_components(standard.config)["vae"]
    vae = losses.merge(graph, abstract, {k: jnp.asarray(v) for k, v in state_to_flat(standard.states["vae"]).items()})
    mean, logvar = (np.asarray(a) for a in vae.encode(jnp.asarray(np.stack(pixels) / 127.5 - 1.0, jnp.float32)))
    # Latent samples (mean + std * noise, what the U-Net trains on): per channel, mean 0 and variance
    # var(mean) + E[exp(logvar)] = 1, up to the 256-sample estimate the trainer made (4 images x 8 x 8 positions).
    np.testing.assert_allclose(mean.mean(axis=(0, 1, 2)), 0.0, atol=0.1)
    np.testing.assert_allclose(mean.var(axis=(0, 1, 2)) + np.exp(logvar).mean(axis=(0, 1, 2)), 1.0, atol=0.15)
    latents = np.stack([standard.encode_image(p) for p in pixels])
    before = plain.decode_latents(np.stack([plain.encode_image(p) for p in pixels]) / plain.config.vae.scaling_factor)
    np.testing.assert_allclose(standard.decode_latents(latents), before, atol=1e-4)


def _train_command(data, out, steps):
    return [
        sys.executable,
        "scripts/train.py",
        "--config=tiny",
        f"--data={data}",
        f"--output_dir={out}",
        "--resolution=32",
        "--batch_size=4",
        f"--max_steps={steps}",
        "--save_every=3",
        "--keep=2",
        "--ema_decay=0.9",
        "--train_text_encoder",
        "--caption_dropout=0.3",
        "--random_flip",
        "--grad_accum=2",
        "--log_every=1",
    ]


def _env(cache=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    if cache is not None:
        # The three runs compile the same step: JAX's persistent cache compiles it once (the same executable).
        env |= {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return env


def test_sigkill_then_resume_is_bit_identical(tmp_path, images):
    """A run killed with SIGKILL after its first checkpoint, then the same command, ends with exactly the
    parameters (model folder and last checkpoint) of an uninterrupted run."""
    steps = 15
    env = _env(cache=tmp_path / "jax_cache")
    whole = subprocess.run(
        _train_command(images, tmp_path / "whole", steps),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert whole.returncode == 0, whole.stderr[-2000:]

    out = tmp_path / "killed"
    process = subprocess.Popen(
        _train_command(images, out, steps), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "3").is_dir():
        time.sleep(0.05)
    time.sleep(0.05)  # somewhere in the following steps or in a save
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "model").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(
        _train_command(images, out, steps), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for component in ("unet", "text_encoder", "vae"):
        a = load_file(str(tmp_path / "whole" / "model" / component / "params.safetensors"))
        b = load_file(str(out / "model" / component / "params.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{component}.{k}")
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["12", "15"]


# ---------------------------------------------------------------------------------------------------------------
# Bad data and flags


def _run_train(*args):
    return subprocess.run(
        [sys.executable, "scripts/train.py", *args], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def _one_error_line(result):
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def test_bad_flags_and_empty_data_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    assert "no images" in _one_error_line(_run_train("--config=tiny", f"--data={empty}", f"--output_dir={out}"))
    data = write_images(tmp_path / "data", n=2)
    line = _one_error_line(_run_train("--config=tiny", f"--data={data}", f"--output_dir={out}", "--resolution=30"))
    assert "--resolution must be a positive multiple of 8" in line
    line = _one_error_line(_run_train(f"--data={data}", f"--output_dir={out}"))
    assert "exactly one of --model" in line
    line = _one_error_line(_run_train("--config=tiny", f"--data={tmp_path / 'nope'}", f"--output_dir={out}"))
    assert "no such file or folder" in line
    assert not (out / "checkpoints").exists()


def test_unreadable_images_and_missing_captions_are_skipped_and_reported(tmp_path):
    from sd_jax.tokenizer import load_tokenizer
    from sd_jax.training.data import DataError, Dataset, read_examples

    data = write_images(tmp_path / "data", n=3)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "broken.txt").write_text("a broken file")
    (data / "lonely.png").write_bytes((data / "000.png").read_bytes())
    examples, skipped = read_examples(data)
    assert [s.split(":")[0] for s in skipped] == ["lonely.png"]
    dataset = Dataset(examples, load_tokenizer(None), resolution=32)
    assert len(dataset) == 3
    assert [s.split(":")[0] for s in dataset.skipped] == ["broken.png"]
    only_broken = tmp_path / "only_broken"
    only_broken.mkdir()
    (only_broken / "x.png").write_bytes(b"garbage")
    (only_broken / "x.txt").write_text("x")
    with pytest.raises(DataError, match="no readable images"):
        Dataset(read_examples(only_broken)[0], load_tokenizer(None), resolution=32)


def test_jsonl_and_csv_data_and_deterministic_order(tmp_path):
    from sd_jax.tokenizer import load_tokenizer
    from sd_jax.training.data import Dataset, read_examples

    write_images(tmp_path / "data", n=4, captions=False)
    (tmp_path / "list.jsonl").write_text(
        "".join(json.dumps({"image": f"data/{i:03d}.png", "caption": f"c{i}"}) + "\n" for i in range(4))
    )
    (tmp_path / "list.csv").write_text("file_name,text\n" + "".join(f"data/{i:03d}.png,c{i}\n" for i in range(4)))
    a, _ = read_examples(tmp_path / "list.jsonl")
    b, _ = read_examples(tmp_path / "list.csv")
    assert a == b and [e.caption for e in a] == ["c0", "c1", "c2", "c3"]
    tokenizer = load_tokenizer(None)
    one = Dataset(a, tokenizer, resolution=16, random_flip=True, caption_dropout=0.5, seed=3, center_crop=False)
    two = Dataset(a, tokenizer, resolution=16, random_flip=True, caption_dropout=0.5, seed=3, center_crop=False)
    batch = one.batch(2, 9)
    again = two.batch(2, 9)
    for k in batch:
        np.testing.assert_array_equal(batch[k], again[k])
    # Each epoch visits every example once, in a new order.
    epochs = [[one.index(q) for q in range(e * 4, e * 4 + 4)] for e in range(3)]
    assert all(sorted(e) == [0, 1, 2, 3] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    assert batch["pixels"].shape == (9, 16, 16, 3)
