"""Entering a schedule part-way (img2img strength) with every sampler, on Gaussian data with an exact denoiser.

Image latents noised to the entry level are exact draws of the noisy marginal there, so a correct sampler entered at
that step must return the data's moments, whatever its order or history (multistep samplers start afresh).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.sampling import samplers, schedules
from tests import gaussian_problem
from tests.test_ddim import SD_SCHEDULER

N = 4096


@pytest.mark.parametrize("sampler", samplers.ORDER)
def test_every_sampler_entered_mid_schedule_keeps_the_data_distribution(sampler):
    steps, strength = 40, 0.5
    full = samplers.schedule(sampler, "karras", SD_SCHEDULER, steps)
    start = schedules.img2img_start(steps, strength)
    entered = schedules.enter_schedule(full, start)
    assert entered.num_steps == full.num_steps - start
    assert entered.init_scale == pytest.approx(float(full.sigmas[start]))
    key_data, key_noise, key_sampler = jax.random.split(jax.random.key(0), 3)
    data = np.asarray(gaussian_problem.initial_samples(key_data, N, 0.0))  # clean "image latents"
    noise = np.asarray(jax.random.normal(key_noise, data.shape))
    x = data + entered.init_scale * noise
    keys = jax.random.split(key_sampler, N)
    out = samplers.run(
        sampler,
        gaussian_problem.exact_denoiser(),
        x,
        sigmas=jnp.asarray(entered.sigmas),
        sigmas_next=jnp.asarray(entered.sigmas_next),
        num_steps=entered.num_steps,
        keys=keys,
        eta=0.0,
        prediction_type="epsilon",
    )
    out = np.asarray(out) * entered.final_scale
    assert np.isfinite(out).all()
    # 20 steps from sigma ~1.5: first-order samplers carry a small discretisation bias, hence the allowance. Euler
    # ancestral under-disperses much more, entered or not: -12% to -18% variance over its full 40-step schedule.
    bias_tol = 0.25 if sampler == "euler_a" else 0.03
    mean_err, var_err = gaussian_problem.check_moments(out, bias_tol=bias_tol)
    print(f"{sampler}: entered at step {start}/{steps}: mean {mean_err:.2f}, var {var_err:.2f} standard errors")


def test_strength_zero_and_one():
    full = samplers.schedule("euler", "default", SD_SCHEDULER, 10)
    nothing = schedules.enter_schedule(full, schedules.img2img_start(10, 0.0))
    assert (nothing.num_steps, nothing.init_scale, nothing.final_scale) == (0, 0.0, 1.0)
    assert schedules.img2img_start(10, 1.0) == 0
    # diffusers' rounding: int(10 * 0.3) == 3 steps run (0.3 * 10 = 3.0000000000000004).
    assert schedules.img2img_start(10, 0.3) == 7
    assert schedules.img2img_start(100, 0.29) == 72  # int(28.999999999999996) == 28
    with pytest.raises(ValueError, match="cannot enter"):
        schedules.enter_schedule(full, 11)
