"""scripts/benchmark.py and sd_jax.benchmark on the tiny random model: every number is produced, and on both sides."""

import subprocess
import sys
from pathlib import Path

import pytest

from sd_jax import benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_run_measures_both_sides_on_the_same_weights():
    options = benchmark.Options(config="tiny", resolution=32, steps=2, rounds=1, compare_torch=True)
    result = benchmark.run(options, log=lambda message: None)
    for side in ("sd_jax", "PyTorch"):
        for key in ("unet_call_s", "text_encoder_s", "vae_decode_s", "txt2img_s", "images_per_s", "steps_per_s"):
            assert result[side][key] > 0, (side, key)
    assert result["sd_jax"]["first_txt2img_s"] >= result["sd_jax"]["txt2img_s"]
    for key, ratio in result["ratios"].items():
        assert ratio == pytest.approx(result["sd_jax"][key] / result["PyTorch"][key])
    assert result["unet_flops"] > 0
    assert result["weight_bytes"] > 4 * result["unet_parameters"]  # float32 U-Net, plus the text encoder and VAE
    assert result["sd_jax"]["peak_rss_bytes"] >= result["rss_before_load_bytes"]
    text = benchmark.table(result)
    assert "| U-Net call, batch 2 (ms) |" in text and "| txt2img, 2 steps (s) |" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resolution=30"], "--resolution must be a multiple of 8"),
        (["--steps=0"], "--steps must be a positive integer"),
        (["--sampler=nope"], "--sampler must be one of"),
        (["--compare=torch", "--sampler=dpmpp_sde"], "--sampler=dpmpp_sde has no diffusers twin"),
    ],
)
def test_bad_flags_are_one_line_errors(args, message):
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--config=tiny", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), run.stderr
    assert "Traceback" not in run.stderr
