"""What the absl scripts share: turning a user's mistake into one line on stderr and a non-zero exit."""

from __future__ import annotations

import sys

from sd_jax.convert.params import ConversionError
from sd_jax.convert.torch_files import CheckpointError
from sd_jax.loading import LoadError
from sd_jax.tokenizer import BPEVocabNotFoundError

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    ConversionError,
    CheckpointError,
    LoadError,
    BPEVocabNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def run_or_exit(fn, *args, **kwargs):
    """Calls fn; a user error (bad path, flag, checkpoint or size) exits 1 with a one-line message, no traceback."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def _raise(error: Exception):
    raise error


def quiet_logs() -> None:
    """Keeps absl's INFO chatter (e.g. JAX probing for a TPU) off a script's stderr."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)


def generate_to_pngs(flags_) -> list:
    """The txt2img script's work: load, generate with a progress bar, save; user errors exit with one line."""
    from tqdm import tqdm

    from sd_jax.images import save_pngs
    from sd_jax.loading import load

    if not flags_.prompt:
        run_or_exit(_raise, ValueError("--prompt is required"))
    if flags_.height % 8 or flags_.width % 8 or flags_.height <= 0 or flags_.width <= 0:
        run_or_exit(
            _raise, ValueError(f"height and width must be positive multiples of 8, got {flags_.height}x{flags_.width}")
        )
    if flags_.model is None:
        print(
            "no --model given: using the tiny random-weight model (sd_jax ships no trained weights), "
            "so the images are noise",
            file=sys.stderr,
        )
    pipe = run_or_exit(load, flags_.model, flags_.dtype, model_type=flags_.model_type, bpe_vocab=flags_.bpe_vocab)
    with tqdm(total=flags_.steps, desc="sampling", unit="step", file=sys.stderr) as bar:

        def progress(step, steps):
            bar.update(max(step - bar.n, 0))

        images = run_or_exit(
            pipe.txt2img,
            flags_.prompt,
            flags_.negative_prompt,
            height=flags_.height,
            width=flags_.width,
            steps=flags_.steps,
            guidance_scale=flags_.guidance_scale,
            sampler=flags_.sampler,
            schedule=flags_.schedule,
            eta=flags_.eta,
            seed=flags_.seed,
            num_images=flags_.num_images,
            clip_skip=flags_.clip_skip,
            guidance_rescale=flags_.guidance_rescale,
            progress=progress,
        )
    return save_pngs(images, flags_.output_dir, [flags_.seed + i for i in range(len(images))])


def list_samplers() -> str:
    """A table of the registered samplers: name, denoiser calls per step, diffusers twin."""
    from sd_jax.sampling.samplers import SAMPLERS, SCHEDULE_TYPES

    rows = [("sampler", "calls/step", "twin")]
    rows += [(s.name, str(s.calls_per_step), s.twin) for s in SAMPLERS.values()]
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]}" for r in rows]
    return "\n".join(lines + ["", f"schedules: {', '.join(SCHEDULE_TYPES)}"])
