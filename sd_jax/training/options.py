"""Every training option once: `TrainOptions`, a frozen dataclass with a one-line error per bad field.

`scripts/train.py` turns its flags into one of these; `sd_jax.training.train(options)` runs it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

COMPONENTS = ("unet", "vae")
LR_SCHEDULES = ("constant", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction")
CROPS = ("center", "random")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """A training run.

    Attributes:
      model: what to fine-tune (anything `sd_jax.load` reads); or None with `config` to train from scratch.
      config: a preset name from `configs/` (random weights), when training from scratch.
      data: a folder of images with same-name .txt captions, or a .jsonl / .csv of (image, caption).
      output_dir: checkpoints, logs, sample grids and the final `model/` folder (a LoRA run: `lora.safetensors`);
        running again resumes.
      component: "unet" (the denoiser, optionally with the text encoder) or "vae" (the autoencoder alone).
      batch_size: examples per optimizer step over all devices and hosts, before gradient accumulation.
      grad_accum: micro-batches of `batch_size` summed into one optimizer step.
      dtype: compute dtype; the master weights, optimizer state and EMA stay float32.
      fsdp: shard parameters and optimizer state over the devices (else they are replicated).
      cache_latents: encode every image once with the VAE and train the U-Net on the cached latents.
      snr_gamma: min-SNR-gamma loss weighting (None: plain MSE).
      noise_offset: scale of a per-channel constant added to the noise.
      kl_weight: the VAE's KL term weight (as in the original AutoencoderKL training).
      vae_decoder_only: train the VAE's decoder only, keeping the latent space (as SD's ft-MSE VAE was tuned).
      vae_scaling_factor: the latent scale written into a VAE run's model (None: kept when fine-tuning,
        measured as 1 / std of the training latents when training from scratch).
      standardize_latents: a VAE run writes a model whose latent channels have zero mean and unit std over the
        training data (`latent_space.standardize_vae`: an exact reparametrization, scaling_factor 1); only the
        written model changes, not the training.
      lora_rank: train LoRA matrices of this rank on the frozen U-Net (`sd_jax.training.lora`) and write
        `lora.safetensors` (kohya format) instead of the `model/` folder.
      lora_alpha: the LoRA scale is lora_alpha / lora_rank (None: alpha = rank, scale 1).
      lora_text_encoder: also train LoRA matrices on the text encoder.
    """

    output_dir: str
    data: str
    model: str | None = None
    config: str | None = None
    component: str = "unet"
    train_text_encoder: bool = False
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    caption_dropout: float = 0.0
    batch_size: int = 1
    grad_accum: int = 1
    max_steps: int = 1000
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    ema_decay: float | None = None
    dtype: str = "float32"
    prediction_type: str | None = None
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    kl_weight: float = 1e-6
    vae_scaling_factor: float | None = None
    vae_decoder_only: bool = False
    standardize_latents: bool = False
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_text_encoder: bool = False
    cache_latents: bool = False
    fsdp: bool = False
    seed: int = 0
    save_every: int = 500
    keep: int = 3
    log_every: int = 10
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    num_workers: int = 4

    def validate(self) -> TrainOptions:
        """Raises ValueError with one line naming the first bad field; returns self."""
        if (self.model is None) == (self.config is None):
            raise ValueError("give exactly one of --model (fine-tune) or --config (train from scratch)")
        if self.component not in COMPONENTS:
            raise ValueError(f"--component must be one of {', '.join(COMPONENTS)}, got {self.component!r}")
        if self.component == "vae" and self.train_text_encoder:
            raise ValueError("--train_text_encoder needs --component=unet")
        if self.vae_decoder_only and self.component != "vae":
            raise ValueError("--vae_decoder_only needs --component=vae")
        if self.standardize_latents and (self.component != "vae" or self.vae_scaling_factor is not None):
            raise ValueError("--standardize_latents needs --component=vae and no --vae_scaling_factor (it writes 1)")
        if self.component == "vae" and self.cache_latents:
            raise ValueError("--cache_latents needs --component=unet (the VAE itself is what trains)")
        if self.cache_latents and not self.center_crop:
            raise ValueError("--cache_latents needs --center_crop (a random crop changes the latents every epoch)")
        if self.lora_rank is None and (self.lora_alpha is not None or self.lora_text_encoder):
            raise ValueError("--lora_alpha and --lora_text_encoder need --lora_rank")
        if self.lora_rank is not None:
            if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
                raise ValueError(f"--lora_rank must be a positive integer, got {self.lora_rank}")
            if self.lora_alpha is not None and not self.lora_alpha > 0:
                raise ValueError(f"--lora_alpha must be positive, got {self.lora_alpha}")
            if self.component != "unet":
                raise ValueError("--lora_rank needs --component=unet (LoRA covers the U-Net and the text encoder)")
            if self.train_text_encoder:
                raise ValueError("--train_text_encoder trains every weight; with --lora_rank use --lora_text_encoder")
        if not isinstance(self.resolution, int) or self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        for name in ("batch_size", "grad_accum", "max_steps", "save_every", "keep", "log_every", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.sample_every < 0 or self.warmup_steps < 0:
            raise ValueError("--sample_every and --warmup_steps must not be negative")
        if self.sample_every and not self.sample_prompts:
            raise ValueError("--sample_every needs --sample_prompts")
        if self.sample_steps < 1:
            raise ValueError(f"--sample_steps must be at least 1, got {self.sample_steps}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"--caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"--ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"--prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}"
            )
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"--snr_gamma must be positive, got {self.snr_gamma}")
        if self.noise_offset < 0 or self.kl_weight < 0 or self.max_grad_norm <= 0:
            raise ValueError("--noise_offset and --kl_weight must not be negative, --max_grad_norm must be positive")
        if self.vae_scaling_factor is not None and not self.vae_scaling_factor > 0:
            raise ValueError(f"--vae_scaling_factor must be positive, got {self.vae_scaling_factor}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")
        if not Path(self.data).exists():
            raise FileNotFoundError(f"--data {self.data}: no such file or folder")
        if self.model is not None and not Path(self.model).exists():
            raise FileNotFoundError(f"--model {self.model}: no such file or folder")
        return self

    @property
    def lora_network_alpha(self) -> float | None:
        """The LoRA's alpha: --lora_alpha, or the rank when not given (None without LoRA)."""
        if self.lora_rank is None:
            return None
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def lora_scale(self) -> float | None:
        """alpha / rank, the factor of a LoRA's down @ up (None without LoRA)."""
        return None if self.lora_rank is None else self.lora_network_alpha / self.lora_rank

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sample_prompts"] = list(self.sample_prompts)
        return d

    def fingerprint(self) -> dict[str, Any]:
        """The options a resumed run must share with the run it continues (what shapes the trajectory)."""
        volatile = {"output_dir", "save_every", "keep", "log_every", "sample_every", "sample_prompts", "sample_steps"}
        volatile |= {"num_workers", "fsdp", "standardize_latents"}
        if self.lr_schedule == "constant":
            volatile.add("max_steps")  # a constant-rate run may be extended; a cosine one decays to its end
        return {k: v for k, v in self.to_dict().items() if k not in volatile}

    def dump(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
