"""Generation speed and memory, sd_jax beside diffusers' PyTorch pipeline on the same weights in the same process.

`run(options)` measures, for one model at one size: the first txt2img call (compilation included), a warm U-Net
call (classifier-free guidance: batch 2 x images), the text encoder, the VAE decode, end-to-end txt2img (images/s,
steps/s), peak host RSS and, on accelerators, peak device memory, plus the U-Net's FLOPs from XLA's cost analysis
(and the model FLOPs utilisation where the device's peak is known). With `compare_torch`, diffusers runs the same
measurements on the same weights; every measurement alternates between the two, run by run, so that drift of the
machine hits both. `scripts/benchmark.py` is the command line.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The diffusers scheduler that twins each sampler (class name, extra settings); absent: no twin.
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

# Dense peak FLOP/s per chip by device kind and compute dtype (vendor figures, no sparsity), for utilisation.
PEAK_FLOPS = {
    ("H200", "bfloat16"): 989e12,
    ("H100", "bfloat16"): 989e12,
    ("A100", "bfloat16"): 312e12,
    ("H200", "float16"): 989e12,
    ("H100", "float16"): 989e12,
    ("A100", "float16"): 312e12,
}


@dataclasses.dataclass(frozen=True)
class Options:
    """What to measure. model: a path for `sd_jax.load`, or None for random weights of the preset `config`."""

    model: str | None = None
    config: str = "sd15"
    resolution: int = 256
    batch: int = 1
    steps: int = 20
    sampler: str = "euler"
    dtype: str = "float32"
    rounds: int = 3
    compare_torch: bool = False
    torch_dtype: str = "auto"  # float32 on CPU, float16 on CUDA


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _device_peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _prompt(i: int) -> str:
    # A new prompt every run, so neither side serves embeddings from a cache.
    return f"a photograph of an astronaut riding a horse, take {i}"


class JaxSide:
    """The sd_jax pipeline and its timed parts."""

    name = "sd_jax"

    def __init__(self, options: Options, log=print):
        import sd_jax
        from sd_jax import compile_cache
        from sd_jax.models import abstract_components

        self.options = options
        compile_cache.clear_shared()  # the first txt2img compiles, whatever this process ran before
        start = time.perf_counter()
        self.pipe = sd_jax.load(options.model or f"random:{options.config}", options.dtype)
        self.load_s = time.perf_counter() - start
        log(f"sd_jax: loaded in {self.load_s:.1f} s")
        dtype = self.pipe.dtype
        graph = abstract_components(self.pipe.config, dtype)["unet"][0]
        unet = self.pipe.config.unet
        size = options.resolution // self.pipe.latent_factor
        rng = np.random.default_rng(0)
        b = 2 * options.batch
        self.unet_args = (
            jnp.asarray(rng.standard_normal((b, size, size, unet.in_channels)), dtype),
            jnp.full((b,), 500.0, jnp.float32),
            jnp.asarray(rng.standard_normal((b, 77, unet.cross_attention_dim)), dtype),
        )
        self._unet = jax.jit(lambda state, *a: nnx.merge(graph, state)(*a))
        self.latents = rng.standard_normal((options.batch, size, size, self.pipe.config.vae.latent_channels))
        self._round = 0

    def unet_flops(self) -> float | None:
        compiled = self._unet.lower(self.pipe.states["unet"], *self.unet_args).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"]) if cost and "flops" in cost else None

    def unet_call(self) -> None:
        self._unet(self.pipe.states["unet"], *self.unet_args).block_until_ready()

    def encode_prompt(self) -> None:
        self._round += 1
        self.pipe.encode_prompt(_prompt(self._round))

    def decode(self) -> None:
        self.pipe.decode_latents(self.latents)

    def txt2img(self) -> None:
        o = self.options
        self._round += 1
        self.pipe.txt2img(
            _prompt(self._round),
            height=o.resolution,
            width=o.resolution,
            steps=o.steps,
            sampler=o.sampler,
            num_images=o.batch,
            seed=self._round,
        )


class TorchSide:
    """diffusers' StableDiffusionPipeline holding the same weights as the sd_jax pipeline."""

    name = "PyTorch"

    def __init__(self, pipe, options: Options, log=print):
        import diffusers
        import torch
        import transformers

        from sd_jax.convert.params import state_to_torch

        self.torch = torch
        self.options = options
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype_name = options.torch_dtype
        if dtype_name == "auto":
            dtype_name = "float16" if self.device == "cuda" else "float32"
        self.dtype = getattr(torch, dtype_name)
        config = pipe.config
        start = time.perf_counter()
        modules = {
            "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.text_encoder.to_dict())),
            "unet": diffusers.UNet2DConditionModel(**config.unet.to_dict()),
            "vae": diffusers.AutoencoderKL(**config.vae.to_dict()),
        }
        for name, module in modules.items():
            weights = state_to_torch(pipe.states[name])
            module.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()})
            del weights
        cls, extra = DIFFUSERS_SCHEDULERS[options.sampler]
        scheduler = getattr(diffusers, cls).from_config(dict(config.scheduler), **extra)
        self.pipe = diffusers.StableDiffusionPipeline(
            **modules,
            tokenizer=pipe.tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).to(self.device, self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        log(f"PyTorch: built in {time.perf_counter() - start:.1f} s ({self.device}, {dtype_name})")
        unet = config.unet
        size = options.resolution // pipe.latent_factor
        rng = np.random.default_rng(0)
        b = 2 * options.batch
        to = dict(device=self.device, dtype=self.dtype)
        self.unet_args = (
            torch.from_numpy(rng.standard_normal((b, unet.in_channels, size, size))).to(**to),
            torch.full((b,), 500.0, device=self.device),
            torch.from_numpy(rng.standard_normal((b, 77, unet.cross_attention_dim))).to(**to),
        )
        self.latents = torch.from_numpy(
            rng.standard_normal((options.batch, config.vae.latent_channels, size, size))
        ).to(**to)
        self._round = 0

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def unet_call(self) -> None:
        with self.torch.inference_mode():
            self.pipe.unet(*self.unet_args)
        self._sync()

    def encode_prompt(self) -> None:
        self._round += 1
        with self.torch.inference_mode():
            self.pipe.encode_prompt(_prompt(self._round), self.device, 1, False)
        self._sync()

    def decode(self) -> None:
        with self.torch.inference_mode():
            self.pipe.vae.decode(self.latents).sample.float().cpu()
        self._sync()

    def txt2img(self) -> None:
        o = self.options
        self._round += 1
        generator = self.torch.Generator(self.device).manual_seed(self._round)
        with self.torch.inference_mode():
            self.pipe(
                _prompt(self._round),
                height=o.resolution,
                width=o.resolution,
                num_inference_steps=o.steps,
                num_images_per_prompt=o.batch,
                generator=generator,
                output_type="np",
            )
        self._sync()

    def peak_device_bytes(self) -> int | None:
        return self.torch.cuda.max_memory_allocated() if self.device == "cuda" else None


PARTS = {"unet_call_s": "unet_call", "text_encoder_s": "encode_prompt", "vae_decode_s": "decode"}


def _parts(sides: list, rounds: int) -> dict[str, dict[str, float]]:
    """Each part's fastest of `rounds` runs per side after an untimed warm-up, the sides taking turns run by run so
    that the machine's drift hits both alike. Returns {side name: {part: seconds}}."""
    best = {side.name: {} for side in sides}
    for part, method in PARTS.items():
        for side in sides:
            getattr(side, method)()
        for _ in range(rounds):
            for side in sides:
                seconds = _timed(getattr(side, method))
                best[side.name][part] = min(best[side.name].get(part, seconds), seconds)
    return best


def unet_pair(config_name: str, batch: int, latent_size: int) -> tuple:
    """diffusers' U-Net of a preset with its default random init, sd_jax's with the same weights, and call inputs.

    Returns:
      (torch_unet, graph, state, (x, timesteps, context)): x is NCHW (B, C, S, S) float32, timesteps (B,) 500,
      context (B, 77, D); numpy arrays, seeded, so every script draws the same.
    """
    import diffusers
    import torch

    from sd_jax.config import preset
    from sd_jax.convert.params import state_from_torch
    from sd_jax.models import abstract_components

    config = preset(config_name)
    torch.manual_seed(0)
    torch_unet = diffusers.UNet2DConditionModel(**config.unet.to_dict()).eval()
    graph, abstract = abstract_components(config)["unet"]
    state = state_from_torch(abstract, {k: v.numpy() for k, v in torch_unet.state_dict().items()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, config.unet.in_channels, latent_size, latent_size)).astype(np.float32)
    timesteps = np.full((batch,), 500.0, np.float32)
    context = rng.standard_normal((batch, 77, config.unet.cross_attention_dim)).astype(np.float32)
    return torch_unet, graph, state, (x, timesteps, context)


def run(options: Options, log=print) -> dict:
    """Measures everything `Options` asks for; returns the numbers (seconds, bytes) as a JSON-ready dict."""
    if options.compare_torch and options.sampler not in DIFFUSERS_SCHEDULERS:
        twins = ", ".join(DIFFUSERS_SCHEDULERS)
        raise ValueError(f"sampler {options.sampler} has no diffusers twin: choose one of {twins}")
    rss_start = peak_rss_bytes()
    ours = JaxSide(options, log)
    pipe = ours.pipe
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(pipe.states["unet"]))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(pipe.states))
    result = {
        "options": dataclasses.asdict(options),
        "device": f"{jax.devices()[0].device_kind} x{len(jax.devices())}",
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "unet_parameters": params,
        "weight_bytes": weight_bytes,
        "load_s": ours.load_s,
        "rss_after_load_bytes": peak_rss_bytes(),
        "rss_before_load_bytes": rss_start,
    }
    first = _timed(ours.txt2img)
    result["sd_jax"] = {"first_txt2img_s": first}
    log(f"sd_jax: first txt2img (with compilation) {first:.1f} s")
    flops = ours.unet_flops()
    result["unet_flops"] = flops
    theirs = None
    if options.compare_torch:
        result["sd_jax"]["peak_rss_bytes"] = peak_rss_bytes()  # before PyTorch holds its copy of the weights
        theirs = TorchSide(pipe, options, log)
        theirs.txt2img()  # warm-up (cuDNN autotuning, allocator)
        result["PyTorch"] = {"dtype": str(theirs.dtype).removeprefix("torch.")}
    sides = [ours] + ([theirs] if theirs else [])
    for name, parts in _parts(sides, options.rounds).items():
        result[name].update(parts)
    # End to end, alternating rounds.
    times = {side.name: [] for side in sides}
    for i in range(options.rounds):
        for side in sides:
            times[side.name].append(_timed(side.txt2img))
            log(f"round {i + 1}/{options.rounds}: {side.name} txt2img {times[side.name][-1]:.2f} s")
    for side in sides:
        best = min(times[side.name])
        out = result[side.name]
        out["txt2img_s"] = best
        out["txt2img_mean_s"] = float(np.mean(times[side.name]))
        out["images_per_s"] = options.batch / best
        out["steps_per_s"] = options.steps / best
    result["sd_jax"].setdefault("peak_rss_bytes", peak_rss_bytes())
    result["sd_jax"]["peak_device_bytes"] = _device_peak_bytes()
    if theirs:
        result["PyTorch"]["peak_device_bytes"] = theirs.peak_device_bytes()
        result["ratios"] = {
            key: result["sd_jax"][key] / result["PyTorch"][key]
            for key in ("unet_call_s", "text_encoder_s", "vae_decode_s", "txt2img_s")
        }
    unet_s = result["sd_jax"]["unet_call_s"]
    result["sd_jax"]["unet_calls_per_s"] = 1.0 / unet_s
    if flops:
        result["sd_jax"]["unet_tflops_per_s"] = flops / unet_s / 1e12
        kind = jax.devices()[0].device_kind
        peak = next((v for (k, d), v in PEAK_FLOPS.items() if k in kind and d == options.dtype), None)
        if peak:
            result["sd_jax"]["unet_mfu"] = flops / unet_s / peak
    return result


def table(result: dict) -> str:
    """The numbers as a Markdown table (sd_jax, PyTorch, sd_jax time / PyTorch time)."""
    o = result["options"]
    lines = [
        f"{result['device']} ({result['backend']}, jax {result['jax']}); model {o['model'] or 'random:' + o['config']} "
        f"({result['unet_parameters'] / 1e6:.0f}M U-Net parameters), {o['resolution']}x{o['resolution']}, "
        f"batch {o['batch']}, {o['steps']} steps of {o['sampler']}, sd_jax {o['dtype']}",
        "",
        "| | sd_jax | PyTorch | sd_jax / PyTorch |",
        "|---|---|---|---|",
    ]
    ours, theirs, ratios = result["sd_jax"], result.get("PyTorch", {}), result.get("ratios", {})

    def row(label, key, fmt, scale=1.0):
        a = ours.get(key)
        b = theirs.get(key)
        cells = [fmt.format(a * scale) if a is not None else "", fmt.format(b * scale) if b is not None else ""]
        ratio = f"{ratios[key]:.2f}" if key in ratios else ""
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {ratio} |")

    row("first txt2img, with compilation (s)", "first_txt2img_s", "{:.1f}")
    row(f"U-Net call, batch {2 * o['batch']} (ms)", "unet_call_s", "{:.1f}", 1e3)
    row("text encoder, one prompt (ms)", "text_encoder_s", "{:.1f}", 1e3)
    row(f"VAE decode, batch {o['batch']} (ms)", "vae_decode_s", "{:.1f}", 1e3)
    row(f"txt2img, {o['steps']} steps (s)", "txt2img_s", "{:.2f}")
    row("images/s", "images_per_s", "{:.3f}")
    row("sampler steps/s (it/s)", "steps_per_s", "{:.2f}")
    row("peak host RSS (GB)", "peak_rss_bytes", "{:.2f}", 1e-9)
    row("peak device memory (GB)", "peak_device_bytes", "{:.2f}", 1e-9)
    if result.get("unet_flops"):
        extra = f"U-Net {result['unet_flops'] / 1e9:.0f} GFLOP per call (XLA cost analysis): "
        extra += f"{ours['unet_tflops_per_s']:.2f} TFLOP/s"
        if "unet_mfu" in ours:
            extra += f", {100 * ours['unet_mfu']:.1f}% of the chip's peak"
        lines += ["", extra]
    lines += ["", f"weights {result['weight_bytes'] / 1e9:.2f} GB, loaded in {result['load_s']:.1f} s"]
    return "\n".join(lines)


def main_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
