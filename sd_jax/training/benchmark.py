"""One training step of sd_jax and of a diffusers-style PyTorch loop on the same weights, for side-by-side timing.

`scripts/benchmark_training.py` wires these together. The sd_jax step is the trainer's own (`make_optimizer`,
`make_train_step`, `jit_train_step`, the denoiser loss); the PyTorch step is the body of diffusers'
`examples/text_to_image/train_text_to_image.py`: VAE latents (or cached moments) -> `DDPMScheduler.add_noise` ->
U-Net -> MSE -> backward -> `clip_grad_norm_` -> `AdamW.step` -> `zero_grad`.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.config import ModelConfig
from sd_jax.convert.params import state_to_flat, state_to_torch
from sd_jax.parallel import batch_mesh
from sd_jax.training import loss as losses
from sd_jax.training import step as steps
from sd_jax.training.options import TrainOptions


def random_batch(config: ModelConfig, batch: int, resolution: int, cached_latents: bool, seed: int = 0) -> dict:
    """A numpy batch in sd_jax's layout (NHWC): `input_ids` (B, 77) and `moments` (B, R/8, R/8, 2C) or `pixels`."""
    rng = np.random.default_rng(seed)
    n_tokens = config.text_encoder.max_position_embeddings
    out = {"input_ids": rng.integers(0, config.text_encoder.vocab_size, (batch, n_tokens)).astype(np.int32)}
    if cached_latents:
        side, c = resolution // 8, config.vae.latent_channels
        mean = rng.standard_normal((batch, side, side, c), dtype=np.float32)
        out["moments"] = np.concatenate([mean, np.full_like(mean, -4.0)], axis=-1)
    else:
        out["pixels"] = rng.uniform(-1.0, 1.0, (batch, resolution, resolution, 3)).astype(np.float32)
    return out


def denoiser_loss_fn(config: ModelConfig, dtype=jnp.float32) -> Callable:
    """The trainer's U-Net loss (`losses.make_loss_fn`) with plain MSE and no noise offset."""
    settings = losses.DiffusionSettings(
        prediction_type=config.prediction_type,
        scaling_factor=float(config.vae.scaling_factor),
        shift_factor=config.vae.shift_factor,
    )
    return losses.make_loss_fn(config, settings, dtype=dtype)


def sd_jax_step(
    config: ModelConfig, states: dict, options: TrainOptions, batch: dict, *, donate: bool = True
) -> Callable[[], jax.Array]:
    """A callable that runs one sd_jax training step on one device (to completion) and returns its loss.

    donate: the step reuses the state's buffers for the new state, as PyTorch's optimizer updates in place (without
    it an SD-1.5 U-Net's weights and AdamW moments are held twice: 20 GB in float32)."""
    trained = ("unet", "text_encoder") if options.train_text_encoder else ("unet",)
    names = [n for n in ("text_encoder", "unet", "vae") if n not in trained and not (n == "vae" and "moments" in batch)]
    params = {n: {k: jnp.asarray(v) for k, v in state_to_flat(states[n]).items()} for n in trained}
    frozen = {n: {k: jnp.asarray(v) for k, v in state_to_flat(states[n]).items()} for n in names}
    mesh = batch_mesh(jax.devices()[:1])
    tx = steps.make_optimizer(options)
    make = functools.partial(steps.init_state, tx=tx, seed=0, ema=options.ema_decay is not None)
    shardings = steps.state_shardings(jax.eval_shape(make, params), mesh, fsdp=False)
    frozen_shardings = steps.state_shardings(frozen, mesh, fsdp=False)
    train_step = steps.jit_train_step(
        steps.make_train_step(denoiser_loss_fn(config), tx, options), shardings, frozen_shardings, mesh, donate=donate
    )
    held = {"state": jax.jit(make, out_shardings=shardings)(params)}
    frozen = jax.device_put(frozen, frozen_shardings)
    # (grad_accum = 1, batch, ...), as the trainer feeds it.
    device_batch = jax.device_put({k: v[None] for k, v in batch.items()}, steps.batch_sharding(mesh))

    def run() -> jax.Array:
        held["state"], metrics = train_step(held["state"], frozen, device_batch)
        jax.block_until_ready((held["state"], metrics))
        return metrics["loss"]

    return run


def torch_step(config: ModelConfig, states: dict, options: TrainOptions, batch: dict, device: str = "cpu") -> Callable:
    """A callable that runs one diffusers-style PyTorch float32 training step (to completion) and returns its loss.

    The modules are diffusers' `UNet2DConditionModel` / `AutoencoderKL` and transformers' `CLIPTextModel`, loaded
    with sd_jax's `states` (the same weights); optimizer settings come from `options`.
    """
    import diffusers
    import torch
    import transformers

    def load(module, name: str):
        prefix = "text_model." if any(k.startswith("text_model.") for k in module.state_dict()) else ""
        tensors = {prefix + k: torch.from_numpy(np.array(v)) for k, v in state_to_torch(states[name]).items()}
        module.load_state_dict(tensors, strict=True)
        return module.to(device)

    unet = load(diffusers.UNet2DConditionModel(**config.unet.to_dict()), "unet").train()
    text = load(
        transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.text_encoder.to_dict())), "text_encoder"
    )
    text.requires_grad_(options.train_text_encoder).train(options.train_text_encoder)
    vae = None
    if "pixels" in batch:
        vae = load(diffusers.AutoencoderKL(**config.vae.to_dict()), "vae").requires_grad_(False).eval()
    scheduler = diffusers.DDPMScheduler.from_config(dict(config.scheduler))
    trained = list(unet.parameters()) + (list(text.parameters()) if options.train_text_encoder else [])
    optimizer = torch.optim.AdamW(
        trained,
        lr=options.learning_rate,
        betas=(options.adam_beta1, options.adam_beta2),
        eps=options.adam_epsilon,
        weight_decay=options.weight_decay,
    )
    input_ids = torch.from_numpy(batch["input_ids"]).long().to(device)
    images = torch.from_numpy(batch["moments"] if vae is None else batch["pixels"]).permute(0, 3, 1, 2)
    images = images.contiguous().to(device)
    shift, scale = config.vae.shift_factor or 0.0, config.vae.scaling_factor
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None

    def run() -> float:
        with torch.no_grad():
            if vae is None:  # cached moments, as DiagonalGaussianDistribution(moments).sample()
                mean, logvar = images.chunk(2, dim=1)
                latents = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
            else:
                latents = vae.encode(images).latent_dist.sample()
            latents = (latents - shift) * scale
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(options.train_text_encoder):
            context = text(input_ids, return_dict=False)[0]
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = unet(noisy, timesteps, context, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, options.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return loss.detach()

    return run


def time_alternating(runs: dict[str, Callable], *, steps: int, warmup: int) -> dict[str, dict]:
    """Times each callable's first call, then `warmup` untimed and `steps` timed calls, alternating between them
    round by round so that drift of the machine (heat, other load) hits every side alike.

    Returns: name -> {"first_s", "times_s" (list), "loss" (the last call's, as a float)}.
    """
    results = {name: {"times_s": []} for name in runs}
    last = {}
    for name, run in runs.items():
        start = time.perf_counter()
        last[name] = run()
        results[name]["first_s"] = time.perf_counter() - start
    for round_index in range(warmup + steps):
        for name, run in runs.items():
            start = time.perf_counter()
            last[name] = run()
            if round_index >= warmup:
                results[name]["times_s"].append(time.perf_counter() - start)
    for name in runs:
        results[name]["loss"] = float(last[name])
    return results


def summarize(result: dict, batch: int) -> dict:
    """min / mean seconds per step, steps/s and examples/s (from the mean) of one side's `time_alternating` result."""
    times = result["times_s"]
    mean = sum(times) / len(times)
    return {**result, "min_s": min(times), "mean_s": mean, "steps_per_s": 1.0 / mean, "examples_per_s": batch / mean}


def machine() -> dict:
    """CPU model and core count, the load average when called, JAX's devices, and the library versions."""
    import importlib.metadata

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    devices = jax.devices()
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "jax_devices": f"{devices[0].device_kind} x{len(devices)}",
        "versions": versions,
    }


__all__ = ["random_batch", "denoiser_loss_fn", "sd_jax_step", "torch_step", "time_alternating", "summarize", "machine"]
