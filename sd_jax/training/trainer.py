"""`train(options)`: fine-tune or train from scratch, over every device of every host, resumable after a kill.

output_dir/run.json          the options; a second run in the same folder must share what shapes training
output_dir/checkpoints/N/    orbax checkpoints (the last `keep`), committed atomically
output_dir/latents.npy       the VAE latent cache (with --cache_latents)
output_dir/log.jsonl         one line per `log_every` steps: loss, learning rate, steps/s, examples/s
output_dir/samples/          a PNG grid of the sample prompts every `sample_every` steps
output_dir/model/            the trained model as a converted folder (EMA weights with EMA), for sd_jax.load
output_dir/lora.safetensors  a LoRA run (--lora_rank) writes its LoRA in kohya's format instead of model/ (the base
                             model is unchanged; EMA weights with EMA); its checkpoints hold only the LoRA matrices
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from sd_jax import checkpoint
from sd_jax.config import ModelConfig, preset
from sd_jax.convert.params import path_to_name, state_to_flat
from sd_jax.loading import load_components
from sd_jax.models import abstract_components, random_components, resolve_dtype
from sd_jax.parallel import batch_mesh
from sd_jax.tokenizer import load_tokenizer
from sd_jax.training import latent_space, lora
from sd_jax.training import loss as losses
from sd_jax.training import step as steps
from sd_jax.training.checkpoints import Checkpoints
from sd_jax.training.data import DataError, Dataset, read_examples
from sd_jax.training.options import TrainOptions

log = logging.getLogger("sd_jax")


def _flat(state) -> dict[str, np.ndarray]:
    return state_to_flat(state)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_run_file(options: TrainOptions, out: Path) -> None:
    """Writes run.json, or checks that the run found in output_dir was started with the same settings."""
    run_file = out / "run.json"
    if run_file.is_file():
        previous = TrainOptions(**{**json.loads(run_file.read_text()), "sample_prompts": ()}).fingerprint()
        current = dataclasses.replace(options, sample_prompts=()).fingerprint()
        changed = sorted(k for k in current if previous.get(k) != current[k])
        if changed:
            diff = ", ".join(f"--{k}={previous.get(k)!r} (now {current[k]!r})" for k in changed)
            raise ValueError(
                f"{out} holds a run started with {diff}; resume with the same flags or pick a new --output_dir"
            )
    if jax.process_index() == 0:
        _write_atomic(run_file, options.dump().encode())


def model_start(options: TrainOptions) -> tuple[ModelConfig, dict, object]:
    """(config, float32 parameter states, tokenizer): a model to fine-tune, or a preset with fresh weights."""
    if options.model is not None:
        config, states, tokenizer = load_components(options.model, "float32")
    else:
        config = preset(options.config)
        states = random_components(config, jnp.float32, seed=options.seed)
        tokenizer = load_tokenizer(None, pad_token=config.pad_token)
    if options.prediction_type is not None:
        config = dataclasses.replace(config, scheduler={**config.scheduler, "prediction_type": options.prediction_type})
    return config, states, tokenizer


def trained_components(options: TrainOptions) -> tuple[str, ...]:
    """The components whose weights change (through a LoRA in a LoRA run)."""
    if options.component == "vae":
        return ("vae",)
    return ("unet", "text_encoder") if options.train_text_encoder or options.lora_text_encoder else ("unet",)


def _host(tree):
    """A (possibly sharded, possibly multi-host) tree as numpy on every host; all processes must call it."""
    leaves = jax.tree.leaves(tree)
    if all(leaf.is_fully_replicated for leaf in leaves):
        return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


_DECODER = ("decoder.", "post_quant_conv.")
LORA_FILE = "lora.safetensors"


class Trainer:
    """One run: data, model, mesh, compiled step and checkpoints; `run()` trains to `max_steps`."""

    def __init__(self, options: TrainOptions, *, show_progress: bool = True, devices: list | None = None):
        """devices: the mesh's devices (default: every device of every host)."""
        self.options = options.validate()
        self.show_progress = show_progress and jax.process_index() == 0
        self.out = Path(options.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        _check_run_file(options, self.out)
        self.config, states, self.tokenizer = model_start(options)
        examples, skipped = read_examples(options.data)
        self.dataset = Dataset(
            examples,
            self.tokenizer,
            resolution=options.resolution,
            center_crop=options.center_crop,
            random_flip=options.random_flip,
            caption_dropout=options.caption_dropout,
            seed=options.seed,
            num_workers=options.num_workers,
        )
        self.skipped = skipped + self.dataset.skipped
        self.mesh = batch_mesh(devices if devices is not None else jax.devices())
        devices, processes = self.mesh.size, jax.process_count()
        if options.batch_size % devices:
            raise ValueError(f"--batch_size={options.batch_size} must be a multiple of the {devices} devices")
        self.compute_dtype = resolve_dtype(options.dtype)
        self.graphs = abstract_components(self.config, self.compute_dtype)
        self.trained = trained_components(options)
        self.states = states  # float32 nnx states of every component (the frozen ones are used as they are)
        self._train_step = None
        self.diffusion = losses.DiffusionSettings(
            prediction_type=self.config.prediction_type,
            snr_gamma=options.snr_gamma,
            noise_offset=options.noise_offset,
            scaling_factor=float(self.config.vae.scaling_factor),
            shift_factor=self.config.vae.shift_factor,
        )
        self.loss_fn = losses.make_loss_fn(
            self.config,
            self.diffusion,
            component=options.component,
            kl_weight=options.kl_weight,
            dtype=self.compute_dtype,
            lora_scale=options.lora_scale,
        )
        self.local_batch = options.batch_size // processes
        if options.batch_size % processes:
            raise ValueError(f"--batch_size={options.batch_size} must be a multiple of the {processes} processes")
        if options.cache_latents:
            self.dataset.latents = self._latent_cache()

    # ----------------------------------------------------------------------------------------------------------
    def _trained_states(self, state: steps.TrainState) -> dict:
        """Every component's nnx state with the trained parameters (the EMA's when EMA is on); all hosts call it."""
        trained = _host(state.ema if state.ema is not None else state.params)
        states = dict(self.states)
        for name in self.trained:
            if self.options.lora_rank is None:
                flat = self._full_flat(name, trained[name])
            else:
                flat = lora.apply_lora(_flat(self.states[name]), trained[name], self.options.lora_scale)
            states[name] = self._state_from_flat(name, flat)
        return states

    def _state_from_flat(self, name: str, flat: dict):
        """A component's nnx state from its flat parameters."""
        from flax import nnx

        abstract = abstract_components(self.config, jnp.float32)[name][1]
        pairs = [(p, v.replace(jnp.asarray(flat[path_to_name(p)]))) for p, v in nnx.to_flat_state(abstract)]
        return nnx.from_flat_state(pairs)

    def _full_flat(self, name: str, trained: dict) -> dict:
        """A component's complete flat parameters: the trained ones over the start point's."""
        return {**_flat(self.states[name]), **trained}

    def _latent_cache(self) -> np.ndarray:
        """VAE moments (N, 2, h, w, 2C) of every image and its mirror image, computed once and kept on disk."""
        vae_flat = {k: jnp.asarray(v) for k, v in _flat(self.states["vae"]).items()}
        n = len(self.dataset)
        digest = latent_cache_digest(self.dataset, vae_flat)
        file = self.out / f"latents-{digest}.npy"
        if file.is_file():
            return np.load(file)
        graph, abstract = self.graphs["vae"]

        @jax.jit
        def encode(flat, pixels):
            mean, logvar = losses.merge(graph, abstract, flat).encode(pixels)
            return jnp.concatenate([mean, logvar], axis=-1)

        from tqdm.auto import tqdm

        chunk, parts = 16, []
        for start in tqdm(range(0, n, chunk), desc="caching latents", disable=not self.show_progress, unit="batch"):
            pixels = np.stack([self.dataset.centered(i) for i in range(start, min(n, start + chunk))])
            both = np.concatenate([pixels, pixels[:, :, ::-1]])
            moments = np.asarray(encode(vae_flat, jnp.asarray(both)), np.float32)
            parts.append(np.stack([moments[: len(pixels)], moments[len(pixels) :]], axis=1))
        latents = np.concatenate(parts)
        if jax.process_index() == 0:
            fd, tmp = tempfile.mkstemp(prefix=".latents.", suffix=".npy", dir=self.out)
            with os.fdopen(fd, "wb") as f:
                np.save(f, latents)
            os.replace(tmp, file)
        return latents

    # ----------------------------------------------------------------------------------------------------------
    def _batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's part of step `step`'s batch, (grad_accum, local_batch, ...)."""
        o = self.options
        position = step * o.batch_size * o.grad_accum
        offset = jax.process_index() * self.local_batch
        micro = [
            self.dataset.batch(position + a * o.batch_size + offset, self.local_batch) for a in range(o.grad_accum)
        ]
        return {k: np.stack([m[k] for m in micro]) for k in micro[0]}

    def _global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        sharding = steps.batch_sharding(self.mesh)
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}

    def _sample_grid(self, pipe, step: int) -> Path:
        o = self.options
        images = pipe.txt2img(
            list(o.sample_prompts), steps=o.sample_steps, seed=o.seed, height=o.resolution, width=o.resolution
        )
        side = o.resolution
        cols = min(len(images), 8)
        rows = -(-len(images) // cols)
        grid = Image.new("RGB", (cols * side, rows * side))
        for i, image in enumerate(images):
            grid.paste(image, ((i % cols) * side, (i // cols) * side))
        folder = self.out / "samples"
        folder.mkdir(exist_ok=True)
        path = folder / f"step-{step:07d}.png"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
        with os.fdopen(fd, "wb") as f:
            grid.save(f, format="PNG")
        os.replace(tmp, path)
        return path

    def _final(self, state: steps.TrainState) -> tuple[ModelConfig, dict]:
        """The config and component states written as the model. A VAE run writes its latent scale: given, kept
        when fine-tuning, or measured on the data from scratch; --standardize_latents folds each latent channel's
        measured mean and std into the VAE instead (scale 1)."""
        config, states = self.config, self._trained_states(state)
        o = self.options
        if o.component != "vae":
            return config, states
        factor = o.vae_scaling_factor
        if o.standardize_latents:
            shift, scale = latent_space.channel_stats(self._latent_samples(states["vae"]))
            flat = latent_space.standardize_vae(_flat(states["vae"]), shift, scale)
            states = {**states, "vae": self._state_from_flat("vae", flat)}
            log.info("latent channels standardized: mean %s, std %s", np.round(shift, 4), np.round(scale, 4))
            factor = 1.0
        elif factor is None and o.model is None:
            factor = float(1.0 / np.std(self._latent_samples(states["vae"])))
        if factor is None:
            return config, states
        return dataclasses.replace(config, vae=dataclasses.replace(config.vae, scaling_factor=float(factor))), states

    def _latent_samples(self, vae_state) -> np.ndarray:
        """Latent samples (mean + std * noise) of the VAE over up to 256 training images, centre-cropped."""
        params = {k: jnp.asarray(v) for k, v in _flat(vae_state).items()}
        graph, abstract = self.graphs["vae"]
        encode = jax.jit(lambda flat, x: losses.merge(graph, abstract, flat).encode(x))
        samples = []
        count = min(len(self.dataset), 256)
        rng = np.random.default_rng(self.options.seed)
        for start in range(0, count, 16):
            pixels = np.stack([self.dataset.centered(i) for i in range(start, min(count, start + 16))])
            mean, logvar = (np.asarray(a, np.float32) for a in encode(params, jnp.asarray(pixels)))
            samples.append(mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape, dtype=np.float32))
        return np.concatenate(samples)

    def write_model(self, state: steps.TrainState) -> Path:
        """The trained model as a converted folder `output_dir/model` (EMA weights when EMA is on)."""
        config, states = self._final(state)
        if jax.process_index() == 0:
            checkpoint.save_converted(self.out / "model", config, states, self.tokenizer, overwrite=True)
        return self.out / "model"

    def write_lora(self, state: steps.TrainState) -> Path:
        """A LoRA run's result as a kohya-format `output_dir/lora.safetensors` (the EMA's LoRA when EMA is on)."""
        o, path = self.options, self.out / LORA_FILE
        trained = _host(state.ema if state.ema is not None else state.params)
        if jax.process_index() == 0:
            metadata = lora.kohya_metadata(
                rank=o.lora_rank,
                alpha=o.lora_network_alpha,
                family=self.config.family,
                v_prediction=self.config.prediction_type == "v_prediction",
                sd_model_name=Path(o.model).name if o.model is not None else o.config,
                steps=int(jax.device_get(state.step)),
                learning_rate=o.learning_rate,
                resolution=(o.resolution, o.resolution),
                network_train_unet_only=not o.lora_text_encoder,
            )
            lora.write_kohya_lora(path, trained, alpha=o.lora_network_alpha, metadata=metadata)
        return path

    def write_output(self, state: steps.TrainState) -> Path:
        """The run's result: the LoRA file of a LoRA run, else the model folder."""
        return self.write_model(state) if self.options.lora_rank is None else self.write_lora(state)

    def start_params(self) -> tuple[dict, dict]:
        """(trained, frozen) flat parameter trees at step 0, `{component: {"path.to.leaf": array}}`: the trained
        weights (fresh LoRA matrices in a LoRA run) and the weights the loss reads but never changes."""
        o = self.options

        def device_flat(name: str) -> dict:
            return {k: jnp.asarray(v) for k, v in _flat(self.states[name]).items()}

        needed = ["vae"] if o.component == "vae" else ["text_encoder", "unet", "vae"]
        if o.cache_latents:
            needed.remove("vae")  # the cached latents stand for the VAE
        if o.lora_rank is not None:
            # A LoRA run trains new matrices on top of every component, all of whose weights stay frozen.
            params = {}
            for index, name in enumerate(self.trained):
                shapes = {k: tuple(v.shape) for k, v in _flat(self.states[name]).items()}
                targets = lora.lora_targets(name, shapes)
                fresh = lora.init_lora(shapes, targets, o.lora_rank, seed=(o.seed, index))
                params[name] = {k: jnp.asarray(v) for k, v in fresh.items()}
            return params, {n: device_flat(n) for n in needed}
        params = {name: device_flat(name) for name in self.trained}
        frozen = {n: device_flat(n) for n in needed if n not in self.trained}
        if o.vae_decoder_only:
            # The encoder (and so the latent space a U-Net was trained on) stays as it is.
            frozen["vae"] = {k: v for k, v in params["vae"].items() if not k.startswith(_DECODER)}
            params["vae"] = {k: v for k, v in params["vae"].items() if k.startswith(_DECODER)}
        return params, frozen

    # ----------------------------------------------------------------------------------------------------------
    def run(self, *, stop_after: int | None = None) -> steps.TrainState:
        """Trains from the latest checkpoint (or step 0) to `max_steps`; writes the model folder (or the LoRA file)
        at the end.

        stop_after: return after this many steps of this call (tests), without writing the model.
        """
        o = self.options
        tx = steps.make_optimizer(o)
        params, frozen = self.start_params()
        make = functools.partial(steps.init_state, tx=tx, seed=o.seed, ema=o.ema_decay is not None)
        abstract = jax.eval_shape(make, params)
        shardings = steps.state_shardings(abstract, self.mesh, o.fsdp)
        frozen_shardings = steps.state_shardings(frozen, self.mesh, o.fsdp)
        checkpoints = Checkpoints(self.out / "checkpoints", keep=o.keep)
        latest = checkpoints.latest_step()
        if latest is None:
            state = jax.jit(make, out_shardings=shardings)(params)
        else:
            state, meta = checkpoints.restore(latest, abstract, shardings)
            expected = latest * o.batch_size * o.grad_accum
            if meta.get("data_position") != expected:
                raise ValueError(f"checkpoint {latest}: data position {meta.get('data_position')} != {expected}")
            log.info("resuming from step %d", latest)
        del params
        frozen = jax.device_put(frozen, frozen_shardings)
        if self._train_step is None:  # once per Trainer: a second run() (a resume) reuses the compiled program
            step_fn = steps.make_train_step(self.loss_fn, tx, o)
            self._train_step = steps.jit_train_step(step_fn, shardings, frozen_shardings, self.mesh)
        train_step = self._train_step
        start = int(jax.device_get(state.step))
        self._trim_log(start)
        pipe = None
        from tqdm.auto import tqdm

        bar = tqdm(
            total=o.max_steps,
            initial=start,
            desc="training",
            unit="step",
            disable=not self.show_progress,
            dynamic_ncols=True,
        )
        prefetch = concurrent.futures.ThreadPoolExecutor(1)
        upcoming = prefetch.submit(self._batch, start) if start < o.max_steps else None
        examples_per_step = o.batch_size * o.grad_accum
        window_start, window_steps = time.perf_counter(), 0
        done = 0
        try:
            for step in range(start, o.max_steps):
                local = upcoming.result()
                upcoming = prefetch.submit(self._batch, step + 1) if step + 1 < o.max_steps else None
                state, metrics = train_step(state, frozen, self._global_batch(local))
                window_steps += 1
                done += 1
                number = step + 1
                if number % o.log_every == 0 or number == o.max_steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    elapsed = time.perf_counter() - window_start
                    rate = window_steps / max(elapsed, 1e-9)
                    record = {
                        "step": number,
                        **metrics,
                        "steps_per_s": rate,
                        "examples_per_s": rate * examples_per_step,
                    }
                    self._log(record)
                    bar.set_postfix(
                        loss=f"{metrics['loss']:.4g}",
                        lr=f"{metrics['learning_rate']:.3g}",
                        ex_s=f"{rate * examples_per_step:.3g}",
                    )
                    window_start, window_steps = time.perf_counter(), 0
                bar.update(1)
                if number % o.save_every == 0 or number == o.max_steps:
                    checkpoints.save(state, {"step": number, "data_position": number * examples_per_step})
                    window_start, window_steps = time.perf_counter(), 0  # rates count training steps, not saving
                if o.sample_every and number % o.sample_every == 0 and o.component == "unet":
                    pipe = self._sample(pipe, state, number)
                    window_start, window_steps = time.perf_counter(), 0
                if stop_after is not None and done >= stop_after:
                    return state
            self.write_output(state)  # also after a resume that had nothing left to do: the folder shows this step
        finally:
            bar.close()
            prefetch.shutdown(wait=True, cancel_futures=True)
            checkpoints.close()
        return state

    def _sample(self, pipe, state, step: int):
        from sd_jax.pipeline import StableDiffusionPipeline

        states = self._trained_states(state)
        if jax.process_index() != 0:
            return pipe
        if pipe is None:
            pipe = StableDiffusionPipeline(self.config, states, self.tokenizer)
        else:
            replicated = NamedSharding(pipe.mesh, PartitionSpec())
            pipe.states = {name: jax.device_put(s, replicated) for name, s in states.items()}
        self._sample_grid(pipe, step)
        return pipe

    def _log(self, record: dict) -> None:
        if jax.process_index() != 0:
            return
        record = {**record, "time": time.time()}
        with (self.out / "log.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def _trim_log(self, step: int) -> None:
        """Drops log lines past the step a resumed run restarts from (written before a kill, then redone)."""
        file = self.out / "log.jsonl"
        if jax.process_index() != 0 or not file.is_file():
            return
        lines = file.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            _write_atomic(file, "".join(line + "\n" for line in kept).encode())


def latent_cache_digest(dataset: Dataset, vae_flat: dict) -> str:
    """A short digest of what the latent cache depends on: the image files, the resolution and the VAE weights."""
    import hashlib

    h = hashlib.sha256()
    h.update(str(dataset.resolution).encode())
    for example in dataset.examples:
        stat = example.image.stat()
        h.update(f"{example.image}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for name in sorted(vae_flat):
        h.update(name.encode())
        h.update(np.asarray(vae_flat[name]).tobytes())
    return h.hexdigest()[:16]


def train(options: TrainOptions, *, show_progress: bool = True) -> Path:
    """Runs (or resumes) a training run to `max_steps`; returns the trained model folder (a LoRA run: its file)."""
    trainer = Trainer(options, show_progress=show_progress)
    for item in trainer.skipped:
        print(f"warning: skipped {item}")
    trainer.run()
    return trainer.out / ("model" if options.lora_rank is None else LORA_FILE)


__all__ = ["train", "Trainer", "TrainOptions", "DataError", "model_start"]
