"""Serves AUTOMATIC1111's web API (/sdapi/v1) and a browser page at / from one loaded model.

python scripts/serve.py                                          # the default model on http://127.0.0.1:7860
python scripts/serve.py --models_dir=models --model=sd15 --api_auth=user:secret --host=0.0.0.0
python scripts/serve.py --model=random:tiny --port=7861           # the tiny random-weight test model (noise)
"""

import sys

from absl import app, flags

flags.DEFINE_string(
    "model",
    None,
    "The model to start with: a name in --models_dir, a path, or random:NAME (default: the shipped shapes64 model).",
)
flags.DEFINE_string(
    "models_dir",
    None,
    "Folder of models (converted or diffusers folders, .safetensors/.ckpt files) "
    "that requests and POST /sdapi/v1/options may switch to by name.",
)
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface; give --api_auth then).")
flags.DEFINE_integer("port", 7860, "Port to listen on.")
flags.DEFINE_string("api_auth", None, "user:password[,user:password]: HTTP basic auth on every route.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Parameter and compute dtype.")
flags.DEFINE_integer(
    "batch_size", None, "Images per compiled call, shared among requests (default: one per device and micro-batch)."
)
flags.DEFINE_integer("micro_batch", 1, "Images per U-Net call on each device (images differ between settings).")
flags.DEFINE_integer("max_body_mb", 64, "Largest request body, in MiB.")
flags.DEFINE_integer("max_steps", 150, "Most steps a request may ask for.")
flags.DEFINE_integer("max_images", 16, "Most images (batch_size x n_iter) one request may ask for.")
flags.DEFINE_integer("max_side", 2048, "Largest width or height a request may ask for, in pixels.")
flags.DEFINE_bool("watermark", True, "Embed the invisible watermark of the original SD scripts (--nowatermark).")
flags.DEFINE_string("lora_dir", None, "Folder of LoRA files that prompts' <lora:NAME:WEIGHT> tags name.")
flags.DEFINE_string("embeddings_dir", None, "Folder of textual-inversion embeddings that prompts may name.")
flags.DEFINE_bool("compile_cache", True, "JAX's persistent compilation cache (--nocompile_cache: off).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from sd_jax.server import serve

    serve.main(FLAGS)


if __name__ == "__main__":
    sys.exit(app.run(main))
