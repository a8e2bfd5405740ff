"""The training losses as pure functions of (parameters, batch, key).

Denoiser: latents x0 are noised to a uniformly drawn timestep t of the training schedule,
x_t = sqrt(alphas_cumprod[t]) x0 + sqrt(1 - alphas_cumprod[t]) noise (diffusers' `DDPMScheduler.add_noise`), and
the U-Net regresses the noise (epsilon) or v = sqrt(alphas_cumprod[t]) noise - sqrt(1 - alphas_cumprod[t]) x0.
Min-SNR-gamma (Hang et al. 2023) weighs each example by min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v).

Autoencoder: the KL-regularised VAE's loss as the original latent-diffusion code trains it, without the
adversarial and perceptual terms: sum |x - decode(z)| over pixels plus kl_weight * KL(q(z|x) || N(0, I)), both
summed per image and averaged over the batch, with z drawn from q(z|x).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sd_jax.config import ModelConfig
from sd_jax.convert.params import path_to_name
from sd_jax.models import abstract_components
from sd_jax.sampling.schedules import alphas_cumprod
from sd_jax.training.lora import apply_lora


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
    """What shapes the denoiser loss (static under jit)."""

    prediction_type: str = "epsilon"
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    clip_skip: int = 1


def merge(graph: nnx.GraphDef, abstract: nnx.State, flat: dict[str, jax.Array], dtype=None) -> nnx.Module:
    """A module from its graph and flat `path.name -> array` parameters (traceable), cast to `dtype` if given."""
    pairs = []
    for path, variable in nnx.to_flat_state(abstract):
        value = flat[path_to_name(path)]
        if dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(dtype)
        pairs.append((path, variable.replace(value)))
    return nnx.merge(graph, nnx.from_flat_state(pairs))


def add_noise(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """x_t for each example (B, H, W, C) at its integer timestep (B,), as `DDPMScheduler.add_noise`."""
    acp = alphas_cumprod[timesteps].astype(jnp.float32)[:, None, None, None]
    return (jnp.sqrt(acp) * x0 + jnp.sqrt(1.0 - acp) * noise).astype(x0.dtype)


def velocity(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """The v-prediction target, as `DDPMScheduler.get_velocity`."""
    acp = alphas_cumprod[timesteps].astype(jnp.float32)[:, None, None, None]
    return (jnp.sqrt(acp) * noise - jnp.sqrt(1.0 - acp) * x0).astype(x0.dtype)


def snr(alphas_cumprod: jax.Array, timesteps: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alphas_cumprod / (1 - alphas_cumprod) at each timestep (diffusers' `compute_snr`)."""
    acp = alphas_cumprod[timesteps].astype(jnp.float32)
    return acp / (1.0 - acp)


def min_snr_weights(alphas_cumprod: jax.Array, timesteps: jax.Array, gamma: float, prediction_type: str):
    """Per-example loss weights min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v-prediction)."""
    s = snr(alphas_cumprod, timesteps)
    clipped = jnp.minimum(s, gamma)
    return clipped / (s + 1.0) if prediction_type == "v_prediction" else clipped / s


def sample_latents(moments: jax.Array, key: jax.Array, settings: DiffusionSettings) -> jax.Array:
    """U-Net latents from VAE moments (B, h, w, 2C): z ~ N(mean, exp(logvar)), shifted and scaled."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
    if settings.shift_factor is not None:
        z = z - settings.shift_factor
    return z * settings.scaling_factor


def diffusion_inputs(latents: jax.Array, key: jax.Array, alphas_cumprod: jax.Array, settings: DiffusionSettings):
    """(noisy latents, timesteps, target, per-example weights) for clean latents (B, h, w, C), from one key."""
    b, _, _, c = latents.shape
    k_noise, k_offset, k_t = jax.random.split(key, 3)
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    if settings.noise_offset:
        noise = noise + settings.noise_offset * jax.random.normal(k_offset, (b, 1, 1, c), jnp.float32)
    timesteps = jax.random.randint(k_t, (b,), 0, alphas_cumprod.shape[0])
    noisy = add_noise(alphas_cumprod, latents, noise, timesteps)
    if settings.prediction_type == "v_prediction":
        target = velocity(alphas_cumprod, latents, noise, timesteps)
    else:
        target = noise
    if settings.snr_gamma is None:
        weights = jnp.ones((b,), jnp.float32)
    else:
        weights = min_snr_weights(alphas_cumprod, timesteps, settings.snr_gamma, settings.prediction_type)
    return noisy, timesteps, target, weights


def denoiser_loss(
    unet, text_encoder, vae, batch: dict, key: jax.Array, alphas_cumprod: jax.Array, settings: DiffusionSettings
) -> tuple[jax.Array, dict]:
    """The weighted mean squared error of the U-Net's prediction for one batch.

    Args:
      unet, text_encoder, vae: the modules (the VAE only when the batch has `pixels`, not cached `moments`).
      batch: `input_ids` (B, 77) and either `pixels` (B, R, R, 3) in [-1, 1] or `moments` (B, h, w, 2C).
      key: this batch's randomness (latent sample, noise, offset, timesteps).
    """
    k_latent, k_diffusion = jax.random.split(key)
    if "moments" in batch:
        moments = batch["moments"]
    else:
        mean, logvar = vae.encode(batch["pixels"])
        moments = jax.lax.stop_gradient(jnp.concatenate([mean, logvar], axis=-1))
    latents = sample_latents(moments, k_latent, settings)
    context = text_encoder(batch["input_ids"], clip_skip=settings.clip_skip)
    noisy, timesteps, target, weights = diffusion_inputs(latents, k_diffusion, alphas_cumprod, settings)
    prediction = unet(noisy.astype(unet.dtype), timesteps, context).astype(jnp.float32)
    per_example = jnp.mean(jnp.square(prediction - target), axis=(1, 2, 3))
    loss = jnp.mean(weights * per_example)
    return loss, {"loss": loss, "mse": jnp.mean(per_example)}


def vae_loss(vae, batch: dict, key: jax.Array, kl_weight: float) -> tuple[jax.Array, dict]:
    """Reconstruction (L1 summed per image) plus kl_weight * KL, averaged over the batch."""
    x = batch["pixels"].astype(jnp.float32)
    mean, logvar = vae.encode(x.astype(vae.dtype))
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
    reconstruction = vae.decode(z.astype(vae.dtype)).astype(jnp.float32)
    l1 = jnp.sum(jnp.abs(x - reconstruction), axis=(1, 2, 3))
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    loss = jnp.mean(l1 + kl_weight * kl)
    return loss, {"loss": loss, "l1": jnp.mean(l1) / x[0].size, "kl": jnp.mean(kl)}


def make_loss_fn(
    config: ModelConfig,
    settings: DiffusionSettings,
    *,
    component: str = "unet",
    kl_weight: float = 1e-6,
    dtype=None,
    lora_scale: float | None = None,
):
    """`loss_fn(params, frozen, batch, key) -> (loss, metrics)` of a model: the VAE loss for component "vae", else
    the denoiser loss. params / frozen: `{component: {"path.to.leaf": array}}`, merged per component (the trained
    leaves over the frozen ones); dtype: the compute dtype (default float32). lora_scale: params are LoRA trees
    (`sd_jax.training.lora`) over complete frozen components, each kernel W + lora_scale * down @ up, in float32
    before the cast to the compute dtype."""
    dtype = jnp.float32 if dtype is None else dtype
    graphs = abstract_components(config, dtype)
    acp = jnp.asarray(alphas_cumprod(config.scheduler), jnp.float32)

    def module(name: str, flat: dict):
        graph, abstract = graphs[name]
        return merge(graph, abstract, flat, dtype=dtype)

    def combine(frozen: dict, trained: dict) -> dict:
        if lora_scale is None:
            return {**frozen, **trained}
        return apply_lora(frozen, trained, lora_scale)

    def loss_fn(params: dict, frozen: dict, batch: dict, key: jax.Array):
        flat = {n: combine(frozen.get(n, {}), params.get(n, {})) for n in {*frozen, *params}}
        if component == "vae":
            return vae_loss(module("vae", flat["vae"]), batch, key, kl_weight)
        vae = None if "moments" in batch else module("vae", flat["vae"])
        unet, text_encoder = module("unet", flat["unet"]), module("text_encoder", flat["text_encoder"])
        return denoiser_loss(unet, text_encoder, vae, batch, key, acp, settings)

    return loss_fn
