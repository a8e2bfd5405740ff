"""Multistep and DPM++ samplers against their diffusers twins (closed-form stand-in model), and the stochastic
ones on a Gaussian problem with an exact denoiser."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, PNDMScheduler, UniPCMultistepScheduler

from sd_jax.sampling import dpmpp, plms, schedules, unipc
from sd_jax.sampling.denoisers import vp_denoiser
from sd_jax.sampling.loop import SamplerOptions
from tests import gaussian_problem
from tests.test_ddim import SD_SCHEDULER

MAX_STEPS = 32  # one compiled loop per sampler serves every step count below


def torch_model(x_t, t):
    """A smooth, timestep-dependent stand-in for the U-Net."""
    return 0.8 * x_t * torch.cos(t / 300.0) + 0.3 * torch.sin(t / 170.0)


def jax_model(x_t, t):
    return 0.8 * x_t * jnp.cos(t / 300.0) + 0.3 * jnp.sin(t / 170.0)


# name -> (sampler, schedule, twin class, twin settings, extra sampler kwargs per prediction type)
TWINS = {
    "dpmpp_2m": (
        dpmpp.sample_dpmpp_2m,
        dpmpp.dpm_multistep_schedule,
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "unipc": (unipc.sample_unipc, unipc.unipc_schedule, UniPCMultistepScheduler, {}),
    "plms": (plms.sample_plms, plms.plms_schedule, PNDMScheduler, {"skip_prk_steps": True}),
}


def run_twin(twin, noise, extra_noise=None):
    latents = torch.from_numpy(noise.copy()) * twin.init_noise_sigma
    for i, t in enumerate(twin.timesteps):
        out = torch_model(twin.scale_model_input(latents, t), t.float())
        kwargs = {} if extra_noise is None else {"variance_noise": torch.from_numpy(extra_noise[i])}
        latents = twin.step(out, t, latents, **kwargs).prev_sample
    return latents.numpy()


@functools.cache
def jitted(name, prediction_type):
    """One jit per sampler and prediction type; the schedule arrays and the step count are arguments."""
    sample = TWINS[name][0]
    extra = {"prediction_type": prediction_type} if name == "plms" else {}

    def run(x, sigmas, sigmas_next, timesteps, train_sigmas, n):
        denoise = vp_denoiser(jax_model, train_sigmas, prediction_type, sigmas=sigmas, timesteps=timesteps)
        if name == "plms":
            extra["sigmas_next"] = sigmas_next
        return sample(denoise, x, sigmas, options=SamplerOptions(num_steps=n, **extra))

    return jax.jit(run)


def run_ours(name, schedule, noise, prediction_type, python_loop=False):
    args = (
        jnp.asarray(noise) * schedule.init_scale,
        jnp.asarray(schedule.sigmas),
        jnp.asarray(schedule.sigmas_next),
        jnp.asarray(schedule.timesteps),
        jnp.asarray(schedule.train_sigmas),
    )
    if python_loop:
        sample = TWINS[name][0]
        denoise = vp_denoiser(jax_model, args[4], prediction_type, sigmas=args[1], timesteps=args[3])
        extra = {"prediction_type": prediction_type, "sigmas_next": args[2]} if name == "plms" else {}
        x = sample(
            denoise, args[0], args[1], options=SamplerOptions(num_steps=schedule.num_steps, python_loop=True, **extra)
        )
    else:
        x = jitted(name, prediction_type)(*args, schedule.num_steps)
    return np.asarray(x) * schedule.final_scale


CONFIGS = {
    "sd": {},
    "sd_trailing": {"timestep_spacing": "trailing"},
    "linear_leading": {
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "steps_offset": 0,
        "timestep_spacing": "leading",
    },
}


def cases():
    for name in TWINS:
        for schedule_type in ("default", "karras"):
            if name == "plms" and schedule_type == "karras":
                continue  # PNDMScheduler has no karras sigmas
            for config_name in CONFIGS:
                if name == "plms" and config_name == "sd_trailing":
                    continue  # the twin's step-1 quirk off "leading" spacing: see test_plms_linspace_spacing_is_close
                for prediction_type in ("epsilon", "v_prediction"):
                    yield name, schedule_type, config_name, prediction_type


@pytest.mark.parametrize("name,schedule_type,config_name,prediction_type", list(cases()))
def test_matches_twin(name, schedule_type, config_name, prediction_type):
    _, make_schedule, twin_cls, settings = TWINS[name]
    config = {**SD_SCHEDULER, **CONFIGS[config_name], "prediction_type": prediction_type}
    twin_settings = dict(settings)
    if schedule_type == "karras":
        twin_settings["use_karras_sigmas"] = True
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    errors = []
    for steps in (1, 2, 7, 25):
        twin = twin_cls.from_config(config, **twin_settings)
        twin.set_timesteps(steps)
        schedule = make_schedule(config, steps, MAX_STEPS, schedule_type)
        n = schedule.num_steps
        np.testing.assert_array_equal(schedule.timesteps[:n], twin.timesteps.numpy().astype(np.float32))
        if name != "plms":
            np.testing.assert_allclose(
                schedule.sigmas[: n + 1], twin.sigmas.numpy(), rtol=1e-5
            )  # twin: float32 cumprod
        assert schedule.init_scale / np.sqrt(1 + schedule.sigmas[0] ** 2) == pytest.approx(twin.init_noise_sigma)
        expected = run_twin(twin, noise)
        ours = run_ours(name, schedule, noise, prediction_type)
        err = np.abs(ours - expected).max() / np.abs(expected).max()
        errors.append(f"{steps}:{err:.1e}")
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    print(f"{name} {schedule_type} {config_name} {prediction_type}: max error / max |latent| by steps {errors}")


def test_plms_linspace_spacing_is_close():
    """With linspace spacing the twin's second step restarts from a mislabelled level (see plms_schedule)."""
    config = {**SD_SCHEDULER, "timestep_spacing": "linspace"}
    twin = PNDMScheduler.from_config(config)
    twin.set_timesteps(25)
    schedule = plms.plms_schedule(config, 25, MAX_STEPS)
    np.testing.assert_array_equal(schedule.timesteps[: schedule.num_steps], twin.timesteps.numpy())
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    expected = run_twin(twin, noise)
    err = np.abs(run_ours("plms", schedule, noise, "epsilon") - expected).max() / np.abs(expected).max()
    print(f"plms linspace (twin quirk at step 1): {err:.1e}")
    assert err < 0.05


def test_dpmpp_2m_sde_matches_twin_with_its_noise():
    config = {**SD_SCHEDULER, "prediction_type": "epsilon"}
    noise = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    keys = jax.random.split(jax.random.key(5), 2)
    from sd_jax.sampling.loop import image_noise

    for schedule_type in ("default", "karras"):
        for steps in (1, 7, 20):
            twin = DPMSolverMultistepScheduler.from_config(
                config, algorithm_type="sde-dpmsolver++", use_karras_sigmas=schedule_type == "karras"
            )
            twin.set_timesteps(steps)
            schedule = dpmpp.dpm_multistep_schedule(config, steps, MAX_STEPS, schedule_type)
            injected = np.stack([np.asarray(image_noise(keys, i, noise.shape[1:])) for i in range(steps)])
            expected = run_twin(twin, noise, injected)
            sigmas = jnp.asarray(schedule.sigmas)
            denoise = vp_denoiser(
                jax_model,
                jnp.asarray(schedule.train_sigmas),
                "epsilon",
                sigmas=sigmas,
                timesteps=jnp.asarray(schedule.timesteps),
            )
            ours = jax.jit(
                lambda x, n, denoise=denoise, sigmas=sigmas: dpmpp.sample_dpmpp_2m_sde(
                    denoise, x, sigmas, keys=keys, options=SamplerOptions(num_steps=n)
                )
            )(jnp.asarray(noise) * schedule.init_scale, steps)
            ours = np.asarray(ours) * schedule.final_scale
            err = np.abs(ours - expected).max() / np.abs(expected).max()
            print(f"dpmpp_2m_sde {schedule_type} steps={steps}: {err:.1e}")
            np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


STOCHASTIC = {
    "dpmpp_2m_sde": (dpmpp.sample_dpmpp_2m_sde, dpmpp.dpm_multistep_schedule),
    "dpmpp_2s_a": (dpmpp.sample_dpmpp_2s_a, dpmpp.k_schedule),
    "dpmpp_sde": (dpmpp.sample_dpmpp_sde, dpmpp.k_schedule),
}


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_stochastic_moments_determinism_and_batch_independence(name):
    sample, make_schedule = STOCHASTIC[name]
    schedule = make_schedule(SD_SCHEDULER, 30, 40, "karras")
    sigmas = jnp.asarray(schedule.sigmas)
    denoise = gaussian_problem.exact_denoiser()
    run = jax.jit(lambda x, keys, n: sample(denoise, x, sigmas, keys=keys, options=SamplerOptions(num_steps=n)))
    n_samples = 4096
    x = gaussian_problem.initial_samples(jax.random.key(0), n_samples, float(schedule.sigmas[0]))
    keys = jax.random.split(jax.random.key(1), n_samples)
    out = np.asarray(run(x, keys, 30))
    mean_err, var_err = gaussian_problem.check_moments(out, bias_tol=0.01)
    print(f"{name} moments (30 karras steps, {n_samples} samples): mean {mean_err:.2f} SE, variance {var_err:.2f} SE")
    np.testing.assert_array_equal(np.asarray(run(x, keys, 30)), out)  # same keys, same samples
    other = np.asarray(run(x, jax.random.split(jax.random.key(2), n_samples), 30))
    assert np.abs(other - out).max() > 1e-2
    alone = np.asarray(run(x[3:4], keys[3:4], 30))
    np.testing.assert_allclose(alone, out[3:4], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "plms"])
def test_traced_steps_match_python_loop(name):
    config = {**SD_SCHEDULER, "prediction_type": "epsilon"}
    make_schedule = TWINS[name][1]
    noise = np.random.default_rng(2).standard_normal((1, 4, 4, 4)).astype(np.float32)
    before = jitted(name, "epsilon")._cache_size()
    for steps in (3, 5, 12):
        schedule = make_schedule(config, steps, MAX_STEPS, "default")
        fast = run_ours(name, schedule, noise, "epsilon")
        slow = run_ours(name, schedule, noise, "epsilon", python_loop=True)
        np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
    assert jitted(name, "epsilon")._cache_size() <= before + 1  # one compilation for every step count


def test_registry_entries():
    entries = dpmpp.samplers() + unipc.samplers() + plms.samplers()
    names = [s.name for s in entries]
    assert names == ["dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s_a", "dpmpp_sde", "unipc", "plms"]
    for s in entries:
        schedule = s.make_schedule(SD_SCHEDULER, 10, 1000, "exponential")
        assert schedule.sigmas.shape == (1001,) and schedule.num_steps in (10, 11)
        assert s.stochastic == (s.name in STOCHASTIC)
    assert schedules.scheduler_settings(SD_SCHEDULER)  # the configs above are ones we accept
