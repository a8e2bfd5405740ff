"""Test setup: several forced CPU devices, strict dtype promotion, exact float32 matmuls, a `key` fixture, and a
compilation cache of the session's own."""

import atexit
import os
import shutil
import tempfile

# Sharding tests need several devices; this must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", os.environ.get("SD_JAX_TEST_PLATFORM", "cpu"))

# `sd_jax.load` and the scripts turn JAX's persistent compilation cache on (sd_jax/compile_cache.py). The tests use a
# fresh folder per session, never ~/.cache; the scripts they run as subprocesses inherit it and load what earlier
# runs compiled (tests/test_batch.py: 367 s -> 328 s on 2 CPU cores). SD_JAX_COMPILE_CACHE=0 (off) or a folder of
# your own (kept across sessions) overrides it.
if "SD_JAX_COMPILE_CACHE" not in os.environ:
    os.environ["SD_JAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="sd_jax_tests_jax_cache-")
    atexit.register(shutil.rmtree, os.environ["SD_JAX_COMPILE_CACHE"], ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
# Parity with PyTorch float32 needs full-precision matmuls on GPU and TPU (no TF32 / bf16 passes).
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(scope="session", autouse=True)
def flush_denormals():
    """The PyTorch references of the random tiny models hit float32 denormals (e.g. in DDIM's last steps), which
    make torch on CPU up to ~70x slower; flushing them to zero changes results far below the parity tolerances."""
    try:
        import torch
    except ImportError:
        yield
        return
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
