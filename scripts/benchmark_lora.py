"""Time to put a LoRA on a full-size model: sd_jax's `read_lora` + `apply_loras` beside diffusers' `load_lora_weights`
+ `fuse_lora`, on random weights of the preset's sizes and a random kohya file of kohya's default targets.

    python scripts/benchmark_lora.py                   # SD-1.5 sizes, rank 16, U-Net and text encoder
    python scripts/benchmark_lora.py --rank=64 --nocompare

Each side: reading the file and adding it at weight 0.8 (the first time, with sd_jax's one-off compilation of its
additions), then again at weight 0.5 (what a prompt with another weight costs), then back to the base weights.
"""

import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

flags.DEFINE_enum("config", "sd15", ["sd15", "sd21_base", "tiny"], "Model preset (sizes only; weights are random).")
flags.DEFINE_integer("rank", 16, "LoRA rank.")
flags.DEFINE_bool("compare", True, "Also time diffusers (PyTorch, CPU) on the same file.")
FLAGS = flags.FLAGS


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _write_lora(config, states, rank: int, path: Path) -> int:
    """A kohya file of random LoRA matrices on kohya's default targets of both components; returns the module count."""
    import jax

    from sd_jax.convert.params import state_to_flat
    from sd_jax.training import lora

    params = {}
    rng = np.random.default_rng(0)
    for component in ("unet", "text_encoder"):
        shapes = {k: v.shape for k, v in state_to_flat(states[component]).items()}
        flat = lora.init_lora(shapes, lora.lora_targets(component, shapes), rank, seed=(0, 0))
        params[component] = {
            k: (v if k.endswith(lora.DOWN) else rng.standard_normal(v.shape).astype(np.float32) * 0.01)
            for k, v in jax.device_get(flat).items()
        }
    lora.write_kohya_lora(path, params, alpha=rank / 2)
    return sum(len(lora.lora_modules(p)) for p in params.values())


def _sd_jax_side(states, path: Path) -> dict:
    import jax

    from sd_jax.lora import apply_loras, read_lora

    def apply(weight):
        return jax.block_until_ready(apply_loras(states, [(lora_file, weight, weight)]))

    lora_file, read = _timed(lambda: read_lora(path))
    _, first = _timed(lambda: apply(0.8))
    _, second = _timed(lambda: apply(0.5))
    _, base = _timed(lambda: apply_loras(states, []))
    return {"read": read, "first add": first, "new weight": second, "back to base": base}


def _torch_side(config, path: Path) -> dict:
    import diffusers
    import torch
    import transformers

    from sd_jax.tokenizer import load_tokenizer

    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.text_encoder.to_dict())),
        unet=diffusers.UNet2DConditionModel(**config.unet.to_dict()),
        vae=diffusers.AutoencoderKL(**config.vae.to_dict()),
        tokenizer=load_tokenizer(None, pad_token=config.pad_token),
        scheduler=diffusers.DDIMScheduler.from_config(dict(config.scheduler)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _, read = _timed(lambda: pipe.load_lora_weights(str(path)))
    _, first = _timed(lambda: pipe.fuse_lora(lora_scale=0.8))

    def reweight():
        pipe.unfuse_lora()
        pipe.fuse_lora(lora_scale=0.5)

    _, second = _timed(reweight)

    def unload():
        pipe.unfuse_lora()
        pipe.unload_lora_weights()

    _, base = _timed(unload)
    return {"read": read, "first add": first, "new weight": second, "back to base": base}


def main(argv):
    del argv
    from sd_jax.config import preset
    from sd_jax.models import random_components

    config = preset(FLAGS.config)
    states = random_components(config)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random_lora.safetensors"
        modules = _write_lora(config, states, FLAGS.rank, path)
        print(f"{FLAGS.config}, rank {FLAGS.rank}: {modules} modules, {path.stat().st_size / 1e6:.1f} MB file")
        results = {"sd_jax": _sd_jax_side(states, path)}
        if FLAGS.compare:
            del states
            results["diffusers"] = _torch_side(config, path)
    print(f"{'seconds':<14}" + "".join(f"{side:>12}" for side in results) + ("   ratio" if len(results) > 1 else ""))
    for part in results["sd_jax"]:
        row = [results[side][part] for side in results]
        ratio = f"   {row[0] / row[1]:.2f}x" if len(row) > 1 else ""
        print(f"{part:<14}" + "".join(f"{value:12.2f}" for value in row) + ratio)


if __name__ == "__main__":
    app.run(main)
