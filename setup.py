"""sd_jax: Stable Diffusion in JAX/Flax for TPU, GPU and CPU."""

from setuptools import setup

setup(
    name="sd_jax",
    version="0.1.0",
    description="Stable Diffusion in JAX/Flax: PyTorch checkpoint conversion, jitted sampling over every device.",
    python_requires=">=3.10",
    packages=[
        "sd_jax",
        "sd_jax.modules",
        "sd_jax.sampling",
        "sd_jax.convert",
        "sd_jax.lora",
        "sd_jax.training",
        "sd_jax.server",
        "sd_jax.configs",
    ],
    # The named model presets live in the repository's configs/ folder and install as sd_jax.configs.
    package_dir={"sd_jax.configs": "configs"},
    # The default model (`sd_jax.load()`): a converted folder, assets/NAME/ with model_index.json, config.json,
    # {text_encoder,unet,vae}/params.safetensors, scheduler/scheduler_config.json and the tokenizer's files.
    package_data={
        "sd_jax": [
            "assets/*/*.json",
            "assets/*/*/*.json",
            "assets/*/*/*.safetensors",
            "assets/*/tokenizer/*.txt",
        ],
        "sd_jax.server": ["static/*.html"],
    },
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.11",  # training checkpoints
        "pyyaml>=6.0",  # the original configs beside SD 2.x single files
        "numpy>=2.0",
        "pillow>=10.0",
        "absl-py>=2.0",
        "safetensors>=0.5",
        "transformers>=5.0",
        "tqdm>=4.66",
        # The invisible watermark's DWT-DCT method; the `invisible-watermark` package itself is installed with
        # `pip install --no-deps invisible-watermark`, since its metadata requires torch (used only by RivaGAN).
        "PyWavelets>=1.4",
        "opencv-python-headless>=4.8",
    ],
    extras_require={
        "cuda": ["jax[cuda13]>=0.10"],
        "tpu": ["jax[tpu]>=0.10"],
        # Reading pickled .ckpt files (torch.load with weights_only=True never runs code from the file).
        "torch": ["torch==2.13.0"],
        # scripts/serve.py: AUTOMATIC1111's web API and the browser page.
        "server": ["fastapi>=0.115", "uvicorn>=0.30"],
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "torch==2.13.0",
            "diffusers==0.42.1",
            # diffusers' LoRA loading (the reference of sd_jax's) needs its PEFT backend.
            "peft==0.21.2",
            "transformers>=5.0",
            "ruff>=0.8",
            # The server's tests: a live server, its clients, and the page in headless Chromium (Debian's
            # chromium and chromium-driver packages; .ci/run installs them).
            "fastapi>=0.115",
            "uvicorn>=0.30",
            "requests>=2.31",
            "selenium>=4.20,<4.52",  # 4.52 requires a certifi newer than the package index holds
        ],
    },
)
