"""Trains a Stable Diffusion model: fine-tunes a checkpoint on your images, or trains one from scratch.

python scripts/train.py --model=models/sd15 --data=photos/ --output_dir=runs/mine --resolution=512 --max_steps=2000
python scripts/train.py --config=shapes64 --component=vae --data=shapes/ --output_dir=runs/vae --resolution=64
python scripts/train.py --model=models/sd15 --data=photos/ --output_dir=runs/lora --lora_rank=16 --lora_alpha=8
  (a LoRA: writes runs/lora/lora.safetensors in kohya's format, for diffusers' load_lora_weights and the web UIs)
Running the same command again resumes from the latest checkpoint in --output_dir.
"""

import sys

from absl import app, flags

flags.DEFINE_string("model", None, "A model to fine-tune (converted folder, diffusers folder or single file).")
flags.DEFINE_string("config", None, "Or a preset from configs/ to train from scratch (random weights).")
flags.DEFINE_string("data", None, "A folder of images with same-name .txt captions, or a .jsonl / .csv.", required=True)
flags.DEFINE_string("output_dir", None, "Checkpoints, logs, samples and the final model/ folder.", required=True)
flags.DEFINE_enum("component", "unet", ["unet", "vae"], "What trains: the U-Net, or the VAE alone.")
flags.DEFINE_bool("train_text_encoder", False, "Train the text encoder with the U-Net.")
flags.DEFINE_integer("resolution", 512, "Training size in pixels (a multiple of 8).")
flags.DEFINE_bool("center_crop", True, "Centre crop (else a random crop) after resizing the shorter side.")
flags.DEFINE_bool("random_flip", False, "Flip images horizontally at random.")
flags.DEFINE_float("caption_dropout", 0.0, "Probability of training on the empty prompt (for guidance).")
flags.DEFINE_integer("batch_size", 1, "Examples per step over all devices and hosts.")
flags.DEFINE_integer("grad_accum", 1, "Micro-batches accumulated per optimizer step.")
flags.DEFINE_integer("max_steps", 1000, "Optimizer steps in all.")
flags.DEFINE_float("learning_rate", 1e-4, "Peak AdamW learning rate.")
flags.DEFINE_enum("lr_schedule", "constant", ["constant", "cosine"], "After the warmup.")
flags.DEFINE_integer("warmup_steps", 0, "Linear warmup from 0.")
flags.DEFINE_float("weight_decay", 1e-2, "AdamW weight decay.")
flags.DEFINE_float("max_grad_norm", 1.0, "Global-norm gradient clipping.")
flags.DEFINE_float("ema_decay", None, "EMA of the weights (e.g. 0.9999); the model is written from the EMA.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Compute dtype (weights stay float32).")
flags.DEFINE_enum("prediction_type", None, ["epsilon", "v_prediction"], "Override the model's scheduler config.")
flags.DEFINE_float("snr_gamma", None, "Min-SNR-gamma loss weighting (5 is usual).")
flags.DEFINE_float("noise_offset", 0.0, "Noise offset (0.05-0.1 helps very dark and bright images).")
flags.DEFINE_float("kl_weight", 1e-6, "--component=vae: weight of the KL term.")
flags.DEFINE_float(
    "vae_scaling_factor", None, "--component=vae: latent scale to write (default: measured if from scratch)."
)
flags.DEFINE_bool("vae_decoder_only", False, "--component=vae: train the decoder only (the latent space is kept).")
flags.DEFINE_bool(
    "standardize_latents", False, "--component=vae: write latents with zero mean, unit std per channel (scale 1)."
)
flags.DEFINE_integer("lora_rank", None, "Train a LoRA of this rank on the frozen model; writes lora.safetensors.")
flags.DEFINE_float("lora_alpha", None, "LoRA alpha: the LoRA is scaled by alpha / rank (default: alpha = rank).")
flags.DEFINE_bool("lora_text_encoder", False, "With --lora_rank: a LoRA on the text encoder too.")
flags.DEFINE_bool("cache_latents", False, "Encode the images once and train on the cached latents.")
flags.DEFINE_bool("fsdp", False, "Shard parameters and optimizer state over the devices.")
flags.DEFINE_integer("seed", 0, "Order, crops, flips, dropped captions, noise and initial weights.")
flags.DEFINE_integer("save_every", 500, "Checkpoint every N steps (and at the end).")
flags.DEFINE_integer("keep", 3, "Checkpoints kept.")
flags.DEFINE_integer("log_every", 10, "Log line every N steps.")
flags.DEFINE_integer("sample_every", 0, "Sample grid every N steps (0: never).")
flags.DEFINE_multi_string("sample_prompts", [], "Prompts of the sample grid (repeat the flag).")
flags.DEFINE_integer("sample_steps", 20, "Sampling steps of the grid.")
flags.DEFINE_integer("num_workers", 4, "Threads decoding images.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (JAX auto-detects on TPU, SLURM).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
FLAGS = flags.FLAGS

_OPTION_FLAGS = (
    "model config data output_dir component train_text_encoder resolution center_crop random_flip caption_dropout "
    "batch_size grad_accum max_steps learning_rate lr_schedule warmup_steps weight_decay max_grad_norm ema_decay "
    "dtype prediction_type snr_gamma noise_offset kl_weight vae_scaling_factor vae_decoder_only standardize_latents "
    "lora_rank lora_alpha lora_text_encoder cache_latents fsdp seed save_every keep log_every sample_every "
    "sample_prompts sample_steps num_workers"
).split()


def main(argv):
    del argv
    from sd_jax.cli import quiet_logs, run_or_exit

    quiet_logs()
    from sd_jax.parallel import initialize_distributed
    from sd_jax.training import TrainOptions, train

    values = {name: FLAGS[name].value for name in _OPTION_FLAGS}
    values["sample_prompts"] = tuple(values["sample_prompts"])
    options = run_or_exit(lambda: TrainOptions(**values).validate())
    run_or_exit(initialize_distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    print(run_or_exit(train, options))


if __name__ == "__main__":
    sys.exit(app.run(main))
