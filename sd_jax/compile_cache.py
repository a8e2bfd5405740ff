"""JAX's persistent compilation cache, on by default: a later process loads the compiled programs an earlier one wrote.

    SD_JAX_COMPILE_CACHE unset or 1   $XDG_CACHE_HOME/sd_jax/jax_cache (default ~/.cache/sd_jax/jax_cache)
    SD_JAX_COMPILE_CACHE=0            off
    SD_JAX_COMPILE_CACHE=FOLDER       that folder

The scripts call `enable` once (or `disable`: their --nocompile_cache) and `sd_jax.load` calls it too; neither
replaces a cache folder the user gave JAX (`jax_compilation_cache_dir` or JAX_COMPILATION_CACHE_DIR) nor turns on a
cache JAX was told to leave off (`jax_enable_compilation_cache`). The cache saves XLA's compile time, not tracing: a
program that compiles in under a second is not written, nor is one with host callbacks (a per-step progress report),
which JAX never caches.

Within a process, `shared_jit` gives every model of one architecture the same jitted functions: the weights are
arguments, so a second pipeline of the same config (another checkpoint of the same family, the server switching
models, a test building its own) reuses the executables the first compiled, callbacks or not.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import jax

ENV_VAR = "SD_JAX_COMPILE_CACHE"
_OFF = ("0", "false", "no", "off")
_ON = ("", "1", "true", "yes", "on")
# Programs that compile faster than this are cheaper to compile again than to store (loading the default model
# alone compiles ~100 casts and copies of a few milliseconds each).
MIN_COMPILE_TIME_SECS = 1.0
# No size floor: the time floor already keeps the small programs out, and -1 stops JAX from choosing a floor itself.
MIN_ENTRY_SIZE_BYTES = -1


def default_dir() -> Path:
    """$XDG_CACHE_HOME/sd_jax/jax_cache, or ~/.cache/sd_jax/jax_cache."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sd_jax" / "jax_cache"


def enable(path: str | os.PathLike | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache, unless it is configured already or turned off.

    Args:
      path: the cache folder. None: a folder the user already gave JAX is kept, and a cache turned off (`disable`)
        stays off; otherwise SD_JAX_COMPILE_CACHE decides (0 turns the cache off, a path chooses the folder, unset
        or 1 means `default_dir()`).

    Returns:
      The cache folder in use, or None when the cache is off (also when the folder cannot be created: the cache
      is an optimisation, never a reason to fail).
    """
    if path is None:
        if not jax.config.jax_enable_compilation_cache:
            return None
        configured = jax.config.jax_compilation_cache_dir
        if configured:
            return Path(configured)
        setting = os.environ.get(ENV_VAR, "").strip()
        if setting.lower() in _OFF:
            return None
        path = default_dir() if setting.lower() in _ON else Path(setting).expanduser()
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", MIN_ENTRY_SIZE_BYTES)
    return path


def disable() -> None:
    """Turns JAX's persistent compilation cache off for this process (`enable()` then leaves it off)."""
    jax.config.update("jax_enable_compilation_cache", False)


_SHARED: dict[tuple, Callable] = {}


def _frozen(value):
    return tuple(sorted(value.items())) if isinstance(value, Mapping) else value


def shared_jit(fn: Callable, *bound, **jit_options) -> Callable:
    """`jax.jit(functools.partial(fn, *bound), **jit_options)`, made once per distinct (fn, bound, options) in this
    process. `bound` are the static leading arguments (graph definitions, a mesh: hashable, or mappings of them);
    `jit_options` must be hashable (tuples for static_argnames)."""
    key = (fn, tuple(_frozen(b) for b in bound), tuple(sorted(jit_options.items())))
    if key not in _SHARED:
        _SHARED[key] = jax.jit(functools.partial(fn, *bound), **jit_options)
    return _SHARED[key]


def clear_shared() -> None:
    """Forgets the shared jitted functions: pipelines built afterwards compile afresh (a benchmark's cold start, a
    test that counts compilations). Pipelines built before keep theirs."""
    _SHARED.clear()
