"""A diffusion problem with an exact denoiser: Gaussian data, so samplers can be checked against known moments.

Data x0 ~ N(mean, diag(var)). At noise level sigma, x = x0 + sigma * eps and the exact denoiser is
E[x0 | x] = mean + var / (var + sigma^2) * (x - mean). A perfect sampler started from the exact marginal at
sigma_max returns samples of N(mean, diag(var)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MEAN = np.array([0.5, -1.0, 0.0, 2.0, 0.3, -0.4, 1.2, 0.0], np.float32)
VAR = np.array([0.25, 1.0, 0.04, 0.5, 2.0, 0.1, 0.8, 1.5], np.float32)


def exact_denoiser(mean=MEAN, var=VAR):
    mean, var = jnp.asarray(mean), jnp.asarray(var)

    def denoise(x, sigma):
        return mean + var / (var + sigma**2) * (x - mean)

    return denoise


def initial_samples(key, n: int, sigma_max: float, mean=MEAN, var=VAR) -> jnp.ndarray:
    """n draws (n, 1, 1, D) of the exact noisy marginal N(mean, var + sigma_max^2), in NHWC latent layout."""
    z = jax.random.normal(key, (n, 1, 1, len(mean)), jnp.float32)
    return jnp.asarray(mean) + jnp.sqrt(jnp.asarray(var) + sigma_max**2) * z


def check_moments(samples: np.ndarray, *, bias_tol: float = 0.0, mean=MEAN, var=VAR) -> tuple[float, float]:
    """Asserts sample mean and variance match the data within 5 standard errors (+ a discretisation allowance).

    Returns the largest mean error and variance error, each in units of its standard error.
    """
    x = np.asarray(samples, np.float64).reshape(len(samples), -1)
    n = len(x)
    mean_err = np.abs(x.mean(0) - mean) / np.sqrt(var / n)
    # The sample variance of n Gaussian draws has standard error var * sqrt(2 / (n - 1)).
    var_err = np.abs(x.var(0, ddof=1) - var) / (var * np.sqrt(2.0 / (n - 1)))
    allowance_mean = bias_tol / np.sqrt(var / n)
    allowance_var = bias_tol / np.sqrt(2.0 / (n - 1))
    assert np.all(mean_err < 5 + allowance_mean), f"mean off by {mean_err.max():.1f} standard errors"
    assert np.all(var_err < 5 + allowance_var), f"variance off by {var_err.max():.1f} standard errors"
    return float(mean_err.max()), float(var_err.max())
