"""Named model presets: `sd_jax.config.preset(name)`; each module's `get_config()` returns a ModelConfig."""
