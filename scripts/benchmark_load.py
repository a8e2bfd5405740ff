"""Host memory and time of `sd_jax.load` on a full-size model: peak RSS above the baseline, over the weight bytes.

A random-weight model of the preset's sizes is written once by diffusers itself (`save_pretrained`, float32
safetensors) into --folder; --single_file and --converted also write it beside that as one original-layout
.safetensors file and as a converted sd_jax folder (FOLDER.safetensors, FOLDER_converted). Each load runs
in a fresh process: the baseline is its RSS with sd_jax and JAX imported and the backend up, the peak is
`ru_maxrss`, and the weight bytes are the loaded parameters' in the loaded dtype. Run nothing else big meanwhile.

    python scripts/benchmark_load.py                        # SD-1.5 sizes, float32 and bfloat16, ~4.3 GB on disk
    python scripts/benchmark_load.py --single_file --converted --dtypes=float32
"""

import json
import subprocess
import sys
from pathlib import Path

from absl import app, flags

flags.DEFINE_enum("config", "sd15", ["sd15", "sd21_base", "tiny"], "Model preset (sizes only; weights are random).")
flags.DEFINE_string("folder", "/tmp/sd15_random", "Where the diffusers folder is written once and then reused.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Dtypes to load in.")
flags.DEFINE_bool("single_file", False, "Also write and load an original-layout single .safetensors file.")
flags.DEFINE_bool("converted", False, "Also write (scripts/convert.py's format) and load a converted sd_jax folder.")
flags.DEFINE_enum("child", None, ["write", "measure"], "Internal: the step a fresh process runs.")
flags.DEFINE_string("path", None, "Internal: what --child=measure loads.")
flags.DEFINE_string("dtype", "float32", "Internal: the dtype --child=measure loads in.")
FLAGS = flags.FLAGS


def _rss_bytes() -> int:
    """The current resident set size (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _measure(path: str, dtype: str) -> dict:
    import resource
    import time

    import jax

    import sd_jax

    jax.devices()  # the backend's own memory belongs to the baseline
    baseline = _rss_bytes()
    start = time.perf_counter()
    pipe = sd_jax.load(path, dtype)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(pipe.states))
    return {"baseline": baseline, "peak": peak, "after": _rss_bytes(), "weights": weights, "seconds": seconds}


def _write_model(config_name: str, folder: Path, single_file: bool, converted: bool) -> None:
    """The random diffusers folder, and the single file and the converted folder made from it, each written under a
    temporary name, then renamed."""
    if not folder.exists():
        import diffusers
        import torch
        import transformers

        from sd_jax.config import preset
        from sd_jax.tokenizer import load_tokenizer

        config = preset(config_name)
        torch.manual_seed(0)
        pipe = diffusers.StableDiffusionPipeline(
            vae=diffusers.AutoencoderKL(**config.vae.to_dict()),
            text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.text_encoder.to_dict())),
            tokenizer=load_tokenizer(None, pad_token=config.pad_token),
            unet=diffusers.UNet2DConditionModel(**config.unet.to_dict()),
            scheduler=diffusers.DDIMScheduler.from_config(dict(config.scheduler)),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        tmp = folder.with_name(folder.name + ".partial")
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        tmp.rename(folder)
    if single_file and not folder.with_suffix(".safetensors").exists():
        from sd_jax.convert import single_file as layout
        from sd_jax.convert.params import clip_state_dict_for_flax
        from sd_jax.convert.torch_files import read_state_dict, write_safetensors

        # The diffusers tensors under their original names (`join_original`), written to disk one by one.
        components = {
            "unet": read_state_dict(folder / "unet" / "diffusion_pytorch_model.safetensors"),
            "vae": read_state_dict(folder / "vae" / "diffusion_pytorch_model.safetensors"),
            "text_encoder": clip_state_dict_for_flax(read_state_dict(folder / "text_encoder" / "model.safetensors")),
        }
        tmp = folder.with_name(folder.name + ".partial.safetensors")
        write_safetensors(tmp, layout.join_original(components, "sd1"), {"format": "pt"})
        tmp.rename(folder.with_suffix(".safetensors"))
    if converted and not _converted_path(folder).exists():
        from sd_jax.checkpoint import save_converted
        from sd_jax.loading import load_components

        save_converted(_converted_path(folder), *load_components(folder))


def _converted_path(folder: Path) -> Path:
    return folder.with_name(folder.name + "_converted")


def _child(*args: str) -> str:
    """Runs a step of this script in a fresh process; its stdout."""
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def main(argv):
    del argv
    folder = Path(FLAGS.folder)
    if FLAGS.child == "write":
        _write_model(FLAGS.config, folder, FLAGS.single_file, FLAGS.converted)
        return
    if FLAGS.child == "measure":
        print(json.dumps(_measure(FLAGS.path, FLAGS.dtype)))
        return
    # Writing runs in its own process, so the PyTorch model's memory is gone before the first load.
    _child(
        "--child=write",
        f"--config={FLAGS.config}",
        f"--folder={folder}",
        f"--single_file={FLAGS.single_file}",
        f"--converted={FLAGS.converted}",
    )
    sources = [("diffusers folder", folder)]
    if FLAGS.single_file:
        sources.append(("single file", folder.with_suffix(".safetensors")))
    if FLAGS.converted:
        sources.append(("converted folder", _converted_path(folder)))
    gb = 1e9
    print(
        f"{'source':<17} {'dtype':<9} {'weights':>8} {'baseline':>9} {'peak':>7} {'peak-base':>9} {'ratio':>6} "
        f"{'after':>7} {'load':>7}"
    )
    for label, path in sources:
        for dtype in FLAGS.dtypes:
            r = json.loads(_child("--child=measure", f"--path={path}", f"--dtype={dtype}").splitlines()[-1])
            extra = r["peak"] - r["baseline"]
            print(
                f"{label:<17} {dtype:<9} {r['weights'] / gb:>6.2f}GB {r['baseline'] / gb:>7.2f}GB "
                f"{r['peak'] / gb:>5.2f}GB {extra / gb:>7.2f}GB {extra / r['weights']:>5.2f}x "
                f"{(r['after'] - r['baseline']) / gb:>5.2f}GB {r['seconds']:>6.1f}s",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(app.run(main))
