"""DDIM schedule and steps against diffusers' DDIMScheduler, with a closed-form stand-in for the U-Net."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from sd_jax.sampling import schedules
from sd_jax.sampling.ddim import sample_ddim
from sd_jax.sampling.denoisers import vp_denoiser
from sd_jax.sampling.loop import SamplerOptions

SD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "skip_prk_steps": True,
}


def fake_model(x_t, t):
    """A smooth, timestep-dependent stand-in for the U-Net, written here in torch, below in jax."""
    return 0.8 * x_t * torch.cos(t / 300.0) + 0.3 * torch.sin(t / 170.0)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"prediction_type": "v_prediction"},
        {"timestep_spacing": "trailing"},
        {"timestep_spacing": "linspace"},
        {"set_alpha_to_one": True, "steps_offset": 0},
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": True},
    ],
)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_matches_diffusers(overrides, steps):
    config = {**SD_SCHEDULER, **overrides}
    twin = DDIMScheduler.from_config(config)
    twin.set_timesteps(steps)
    schedule = schedules.ddim_schedule(config, steps, max_steps=64)
    np.testing.assert_array_equal(schedule.timesteps[:steps], twin.timesteps.numpy().astype(np.float32))

    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    latents = torch.from_numpy(noise.copy()) * twin.init_noise_sigma
    for t in twin.timesteps:
        out = fake_model(latents, t.float())
        latents = twin.step(out, t, latents).prev_sample

    def model_fn(x_t, t):
        return 0.8 * x_t * jnp.cos(t / 300.0) + 0.3 * jnp.sin(t / 170.0)

    settings = schedules.scheduler_settings(config)
    denoise = vp_denoiser(model_fn, jnp.asarray(schedule.train_sigmas), settings["prediction_type"])
    run = jax.jit(
        lambda x, n: sample_ddim(
            denoise,
            x,
            jnp.asarray(schedule.sigmas),
            options=SamplerOptions(
                num_steps=n,
                sigmas_next=jnp.asarray(schedule.sigmas_next),
                clip_x0=settings["clip_sample_range"] if settings["clip_sample"] else None,
            ),
        )
    )
    ours = np.asarray(run(jnp.asarray(noise) * schedule.init_scale, steps)) * schedule.final_scale
    # float32 through up to 50 steps: ~1e-7 rounding per operation accumulates to ~1.5e-6 (measured).
    err = np.abs(ours - latents.numpy()).max() / np.abs(latents.numpy()).max()
    print(f"ddim {overrides} steps={steps}: max error relative to max |latent| {err:.2e}")
    np.testing.assert_allclose(ours, latents.numpy(), rtol=1e-5, atol=1e-5)


def test_python_loop_matches_fori_loop():
    config = SD_SCHEDULER
    schedule = schedules.ddim_schedule(config, 10, max_steps=20)
    denoise = vp_denoiser(lambda x, t: 0.5 * x + t / 1000.0, jnp.asarray(schedule.train_sigmas), "epsilon")
    x = jax.random.normal(jax.random.key(1), (1, 4, 4, 4))
    options = SamplerOptions(num_steps=10)
    a = sample_ddim(denoise, x, jnp.asarray(schedule.sigmas), options=options.replace(python_loop=True))
    b = jax.jit(lambda x: sample_ddim(denoise, x, jnp.asarray(schedule.sigmas), options=options))(x)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_eta_noise_is_keyed_per_image():
    schedule = schedules.ddim_schedule(SD_SCHEDULER, 5)
    denoise = vp_denoiser(lambda x, t: 0.5 * x, jnp.asarray(schedule.train_sigmas), "epsilon")
    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(jax.random.key(1), (3, 4, 4, 4))
    run = jax.jit(
        lambda x, k, eta: sample_ddim(denoise, x, jnp.asarray(schedule.sigmas), keys=k, options=SamplerOptions(eta=eta))
    )
    batch = np.asarray(run(x, keys, 1.0))
    alone = np.asarray(run(x[1:2], keys[1:2], 1.0))
    np.testing.assert_allclose(batch[1:2], alone, rtol=1e-6, atol=1e-6)
    deterministic = np.asarray(run(x, keys, 0.0))
    assert np.abs(batch - deterministic).max() > 1e-2


def test_bad_step_count():
    with pytest.raises(ValueError, match="steps must be between"):
        schedules.ddim_schedule(SD_SCHEDULER, 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta_matches_diffusers_given_the_same_noise(prediction_type):
    """With eta > 0 the twin's step, handed our per-image noise as `variance_noise`, lands where ours does."""
    from sd_jax.sampling.loop import image_noise

    config = {**SD_SCHEDULER, "prediction_type": prediction_type}
    steps, eta = 8, 0.7
    twin = DDIMScheduler.from_config(config)
    twin.set_timesteps(steps)
    schedule = schedules.ddim_schedule(config, steps)
    keys = jax.random.split(jax.random.key(4), 2)
    noise = np.random.default_rng(2).standard_normal((2, 8, 8, 4)).astype(np.float32)
    latents = torch.from_numpy(noise.copy())
    for i, t in enumerate(twin.timesteps):
        out = fake_model(latents, t.float())
        injected = torch.from_numpy(np.array(image_noise(keys, i, (8, 8, 4))))
        latents = twin.step(out, t, latents, eta=eta, variance_noise=injected).prev_sample

    def model_fn(x_t, t):
        return 0.8 * x_t * jnp.cos(t / 300.0) + 0.3 * jnp.sin(t / 170.0)

    denoise = vp_denoiser(model_fn, jnp.asarray(schedule.train_sigmas), prediction_type)
    ours = sample_ddim(
        denoise,
        jnp.asarray(noise) * schedule.init_scale,
        jnp.asarray(schedule.sigmas),
        keys=keys,
        options=SamplerOptions(eta=eta),
    )
    ours = np.asarray(ours) * schedule.final_scale
    np.testing.assert_allclose(ours, latents.numpy(), rtol=1e-5, atol=1e-5)


def test_ddim_eta_one_reproduces_gaussian_moments():
    """DDIM with eta=1 (ancestral) on data whose exact denoiser is known: the samples have the data's moments."""
    from tests.gaussian_problem import check_moments, exact_denoiser, initial_samples

    # DDIM is first order: at 60 steps its variance is visibly biased (6 standard errors); at 150 it is not.
    sigmas = np.concatenate([schedules.sigmas_karras(150, 0.03, 15.0), [0.0]]).astype(np.float32)
    n = 4096
    x = initial_samples(jax.random.key(0), n, float(sigmas[0]))
    keys = jax.random.split(jax.random.key(1), n)
    run = jax.jit(
        lambda x, k: sample_ddim(exact_denoiser(), x, jnp.asarray(sigmas), keys=k, options=SamplerOptions(eta=1.0))
    )
    samples = np.asarray(run(x, keys))
    mean_err, var_err = check_moments(samples)
    print(f"ddim eta=1: mean error {mean_err:.2f}, variance error {var_err:.2f} standard errors")
    again = np.asarray(run(x, keys))
    np.testing.assert_array_equal(samples, again)
