"""Generates images from text and writes them as PNGs.

python scripts/txt2img.py --model=models/sd15 --prompt="a photo of a cat" --steps=30 --num_images=4
python scripts/txt2img.py --prompt="a photo of a cat"    # no --model: a tiny untrained model (noise images)
"""

import sys

from absl import app, flags

flags.DEFINE_string("model", None, "Converted folder, diffusers folder or single file; default: tiny random model.")
flags.DEFINE_string("prompt", None, "What to draw (required unless --list_samplers).")
flags.DEFINE_string("negative_prompt", "", "What to steer away from.")
flags.DEFINE_integer("steps", 50, "Denoising steps.")
flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance scale (<= 1 turns guidance off).")
flags.DEFINE_string("sampler", "ddim", "Sampler name.")
flags.DEFINE_string("schedule", "default", "Noise schedule.")
flags.DEFINE_float("eta", 0.0, "DDIM eta: 0 deterministic, 1 ancestral.")
flags.DEFINE_float("guidance_rescale", 0.0, "Rescale of the guided prediction, in [0, 1] (0.7 for zero-SNR models).")
flags.DEFINE_bool("list_samplers", False, "List the samplers (name, denoiser calls per step, twin) and exit.")
flags.DEFINE_integer("seed", 0, "Image i uses seed + i.")
flags.DEFINE_integer("height", 512, "Image height, a multiple of 8.")
flags.DEFINE_integer("width", 512, "Image width, a multiple of 8.")
flags.DEFINE_integer("num_images", 1, "How many images.")
flags.DEFINE_integer("clip_skip", 1, "1: the text encoder's last layer; 2: the penultimate; ...")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Parameter and compute dtype.")
flags.DEFINE_string("model_type", "auto", "Single files: sd15, sd15_inpainting, sd21_base, sd21_768_v, ...")
flags.DEFINE_string("bpe_vocab", None, "Single files / no model: CLIP's bpe_simple_vocab_16e6.txt.gz.")
flags.DEFINE_string("output_dir", "outputs", "Where the PNGs go (existing files are never overwritten).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax.cli import quiet_logs

    quiet_logs()
    from sd_jax.cli import generate_to_pngs, list_samplers

    if FLAGS.list_samplers:
        print(list_samplers())
        return
    for path in generate_to_pngs(FLAGS):
        print(path)


if __name__ == "__main__":
    sys.exit(app.run(main))
