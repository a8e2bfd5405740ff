"""JAX's persistent compilation cache (`sd_jax.compile_cache`): where it goes, the off switches, --compile_cache."""

import subprocess
import sys
import textwrap

import jax
import pytest
from absl import flags
from jax.experimental.compilation_cache import compilation_cache

from sd_jax import cli, compile_cache
from tests.test_convert import ROOT, run_script

_SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_enable_compilation_cache",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


@pytest.fixture
def jax_cache_settings(monkeypatch):
    """Restores JAX's cache settings after a test that changes them; starts with no folder configured.

    JAX opens its cache folder once, at the first compile after one is set: `reset_cache` makes it open the folder
    of the settings in force anew.
    """
    saved = {name: getattr(jax.config, name) for name in _SETTINGS}
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def test_default_folder_is_under_the_user_cache(jax_cache_settings, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.enable() == tmp_path / "sd_jax" / "jax_cache"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "sd_jax" / "jax_cache")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_TIME_SECS
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == compile_cache.MIN_ENTRY_SIZE_BYTES
    assert (tmp_path / "sd_jax" / "jax_cache").is_dir()


def test_without_xdg_the_folder_is_in_home(jax_cache_settings, monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache.default_dir() == tmp_path / ".cache" / "sd_jax" / "jax_cache"


@pytest.mark.parametrize("off", ["0", "false", "off"])
def test_environment_variable_turns_it_off(jax_cache_settings, monkeypatch, off):
    monkeypatch.setenv(compile_cache.ENV_VAR, off)
    assert compile_cache.enable() is None
    assert jax.config.jax_compilation_cache_dir is None


def test_environment_variable_chooses_the_folder(jax_cache_settings, monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "mine"))
    assert compile_cache.enable() == tmp_path / "mine"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")


def test_a_users_own_folder_and_thresholds_are_kept(jax_cache_settings, monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "ours"))
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 7.0)
    assert compile_cache.enable() == tmp_path / "theirs"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "theirs")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 7.0
    assert not (tmp_path / "ours").exists()


def test_load_keeps_a_users_folder(jax_cache_settings, tmp_path):
    import sd_jax

    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
    sd_jax.load("random:tiny")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "theirs")


def test_disable_keeps_it_off_and_an_explicit_folder_is_used(jax_cache_settings, tmp_path):
    compile_cache.disable()
    assert compile_cache.enable() is None
    assert jax.config.jax_compilation_cache_dir is None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
    assert compile_cache.enable(tmp_path / "chosen") == tmp_path / "chosen"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "chosen")


def test_an_unwritable_folder_leaves_the_cache_off(jax_cache_settings, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "file" / "cache"))
    assert compile_cache.enable() is None
    assert jax.config.jax_compilation_cache_dir is None


def test_compile_cache_flag(jax_cache_settings, monkeypatch, tmp_path):
    values = flags.FlagValues()
    cli._define_compile_cache_flag(values)
    values(["prog"])
    assert values.compile_cache is True
    values(["prog", "--nocompile_cache"])
    assert values.compile_cache is False
    cli.use_compile_cache(values.compile_cache)
    assert jax.config.jax_enable_compilation_cache is False
    jax.config.update("jax_enable_compilation_cache", True)
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "cache"))
    cli.use_compile_cache(True)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")


def test_script_flag_reaches_the_cache(tmp_path, monkeypatch):
    # A missing model stops the script right after it set up the cache (which creates the folder), before any work.
    for flag, made in (("--compile_cache", True), ("--nocompile_cache", False)):
        folder = tmp_path / flag.removeprefix("--")
        monkeypatch.setenv(compile_cache.ENV_VAR, str(folder))
        result = run_script("scripts/txt2img.py", "--prompt=x", f"--model={tmp_path / 'nope'}", flag)
        assert result.returncode == 1 and "no such file or folder" in result.stderr, result.stderr
        assert folder.is_dir() == made, flag


_PROGRAM = textwrap.dedent(
    """
    import sys

    import jax
    import jax.numpy as jnp
    import numpy as np

    from sd_jax import compile_cache

    hits = []
    jax.monitoring.register_event_listener(
        lambda name, **_: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None
    )
    compile_cache.enable(sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # these compile in milliseconds

    def reported(x):
        jax.debug.callback(lambda v: None, x)
        return x + 1

    x = np.arange(3.0, dtype=np.float32)
    jax.jit(lambda x: jnp.sin(x) * 2)(x).block_until_ready()
    jax.jit(reported)(x).block_until_ready()
    print(len(hits))
    """
)


def test_cpu_cache_is_written_and_read_by_the_next_process(tmp_path):
    """JAX 0.10 on CPU writes entries and the next process loads them. A program with a host callback (the scripts'
    per-step progress report) is never written: JAX cannot serialise the Python function it calls."""
    folder = tmp_path / "cache"

    def run():
        env = {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
        result = subprocess.run(
            [sys.executable, "-c", _PROGRAM, str(folder)], capture_output=True, text=True, env=env, timeout=300
        )
        assert result.returncode == 0, result.stderr
        return int(result.stdout.split()[-1])

    assert run() == 0
    entries = sorted(p.name for p in folder.iterdir() if p.name.endswith("-cache"))
    assert [e.split("-")[0] for e in entries] == ["jit__lambda"], entries
    assert run() == 1  # the second process loads the lambda's executable instead of compiling it
