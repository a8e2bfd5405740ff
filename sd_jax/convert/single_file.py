"""The original single-file Stable Diffusion layout (CompVis / Stability `.ckpt` / `.safetensors`) -> diffusers names.

One checkpoint file holds the whole latent diffusion model under four prefixes:

  model.diffusion_model.*      the U-Net (`input_blocks`, `middle_block`, `output_blocks`, `time_embed`, `out`)
  model_ema.*                  optional EMA copy of the U-Net, names with the dots removed
  first_stage_model.*          the VAE (`encoder.down.N.block.M`, `decoder.up.N` in reverse order, `mid.attn_1`)
  cond_stage_model.*           the text encoder: `transformer.text_model.*` (SD 1.x, Hugging Face CLIP) or
                               `model.*` (SD 2.x, OpenCLIP ViT-H/14 with fused q/k/v)

`split_original` turns it into three state dicts named as the diffusers `UNet2DConditionModel`,
`AutoencoderKL` and transformers `CLIPTextModel` (without the `text_model.` prefix) name theirs, values numpy in the
PyTorch layout. It works from a name table built once from the structure found in the keys (number of levels,
layers per block, which blocks have attention, transformer depth), plus three small per-tensor transforms
(identity, 1x1 conv -> linear, split fused q/k/v in thirds). Every key of the file is either used by exactly one
table entry or skipped for a reason listed in `_skip_reason`; anything else is an error, as is an entry the
table needs and the file lacks.

`join_original` writes such a file from diffusers-named state dicts by reading the same tables the other way: a table
is built from the names found on one side (`_Layout`), so the name mapping exists once.

What a file cannot tell: whether the U-Net predicts epsilon or v (SD 2.x 768-v vs 512-base), nor the sample size.
The caller decides those (a flag or a named config); `infer_configs` only reports what the weights determine.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sd_jax.convert.torch_files import CheckpointError

log = logging.getLogger(__name__)

MODEL_TYPES = ("sd1", "sd1_inpainting", "sd2", "sd2_inpainting")

UNET = "model.diffusion_model."
EMA = "model_ema."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."

# Buffers of the original training code's DDPM schedule: recomputed from the scheduler config, never loaded.
SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "lvlb_weights",
        "logvar",
    }
)
EMA_BOOKKEEPING = frozenset({EMA + "decay", EMA + "num_updates"})


# ----------------------------------------------------------------------------------------------- per-tensor transforms


def _same(array: np.ndarray) -> tuple[np.ndarray, ...]:
    return (array,)


def _conv1x1_to_linear(array: np.ndarray) -> tuple[np.ndarray, ...]:
    """(C_out, C_in, 1, 1) conv kernel -> (C_out, C_in) linear weight (the VAE mid-block attention)."""
    if array.ndim > 2:
        if any(d != 1 for d in array.shape[2:]):
            raise CheckpointError(f"expected a 1x1 convolution kernel, got shape {array.shape}")
        array = array.reshape(array.shape[:2])
    return (array,)


def _split_qkv(array: np.ndarray) -> tuple[np.ndarray, ...]:
    """OpenCLIP's fused in_proj (3D, ...) -> q, k, v each (D, ...)."""
    if array.shape[0] % 3:
        raise CheckpointError(f"fused q/k/v projection of shape {array.shape} does not split in thirds")
    return tuple(np.split(array, 3, axis=0))


def _linear_to_conv1x1(array: np.ndarray) -> np.ndarray:
    """The inverse of `_conv1x1_to_linear`: (C_out, C_in) -> (C_out, C_in, 1, 1)."""
    return array.reshape(array.shape + (1,) * (4 - array.ndim))


def _fuse_qkv(*arrays: np.ndarray) -> np.ndarray:
    """The inverse of `_split_qkv`: q, k, v -> the fused in_proj."""
    return np.concatenate(arrays, axis=0)


# Each transform's inverse, for writing a file (`join_original`): targets -> the source tensor.
_INVERSE: dict[Callable, Callable[..., np.ndarray]] = {
    _same: lambda array: array,
    _conv1x1_to_linear: _linear_to_conv1x1,
    _split_qkv: _fuse_qkv,
}


@dataclasses.dataclass(frozen=True)
class Rename:
    """One table entry: a source tensor becomes one or more target tensors through `transform`."""

    source: str
    targets: tuple[str, ...]
    transform: Callable[[np.ndarray], tuple[np.ndarray, ...]] = _same


# ------------------------------------------------------------------------------------------------------- leaf tables

_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_CLIP_LAYER = {
    **{f"self_attn.{p}_proj": f"self_attn.{p}_proj" for p in ("q", "k", "v", "out")},
    "layer_norm1": "layer_norm1",
    "layer_norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# Per transformer block of a U-Net attention (SpatialTransformer): these names are the same on both sides.
_TRANSFORMER_BLOCK_WB = ("norm1", "norm2", "norm3", "attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_TRANSFORMER_BLOCK_W = tuple(f"attn{a}.to_{p}" for a in (1, 2) for p in ("q", "k", "v"))


def _module(src: str, dst: str, leaves: Mapping[str, str], transform=_same) -> list[Rename]:
    """weight and bias of each leaf module `src.a` -> `dst.b` for a -> b in `leaves`."""
    sep_s = "." if src else ""
    sep_d = "." if dst else ""
    return [
        Rename(f"{src}{sep_s}{a}.{p}", (f"{dst}{sep_d}{b}.{p}",), transform)
        for a, b in leaves.items()
        for p in ("weight", "bias")
    ]


def _wb(src: str, dst: str) -> list[Rename]:
    return [Rename(f"{src}.{p}", (f"{dst}.{p}",)) for p in ("weight", "bias")]


def _indices(keys: Iterable[str], prefix: str) -> list[int]:
    """The distinct integers N of keys `prefix N.*`, sorted."""
    found = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _has_prefix(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The keys of one side of the tables, answering the structural questions the tables are built from.

    The tables are built from the names found on either side: original names when reading a file
    (`split_original`), diffusers names when writing one (`join_original`). Each question names the module on both
    sides and only the side at hand is looked up, so one table serves both directions.
    """

    keys: frozenset[str]
    original: bool

    def has(self, src: str, dst: str, *, besides: str | None = None) -> bool:
        """Whether module `src` (original name) / `dst` (diffusers name) has parameters; on the original side,
        parameters other than those of the module `besides`."""
        if not self.original:
            return _has_prefix(self.keys, dst + ".")
        return any(k.startswith(src + ".") and not (besides and k.startswith(besides + ".")) for k in self.keys)

    def indices(self, src: str, dst: str) -> list[int]:
        """The numbers N of the modules `src.N` (original) / `dst.N` (diffusers) found, sorted."""
        return _indices(self.keys, (src if self.original else dst) + ".")


# ----------------------------------------------------------------------------------------------------------- U-Net


def _unet_resnet(layout: _Layout, src: str, dst: str) -> list[Rename]:
    table = _module(src, dst, _UNET_RESNET)
    if layout.has(f"{src}.skip_connection", f"{dst}.conv_shortcut"):
        table += _wb(f"{src}.skip_connection", f"{dst}.conv_shortcut")
    return table


def _unet_attention(layout: _Layout, src: str, dst: str) -> list[Rename]:
    table = _module(src, dst, {"norm": "norm", "proj_in": "proj_in", "proj_out": "proj_out"})
    for t in layout.indices(f"{src}.transformer_blocks", f"{dst}.transformer_blocks") or [0]:
        block = f"transformer_blocks.{t}"
        table += _module(f"{src}.{block}", f"{dst}.{block}", {m: m for m in _TRANSFORMER_BLOCK_WB})
        table += [Rename(f"{src}.{block}.{m}.weight", (f"{dst}.{block}.{m}.weight",)) for m in _TRANSFORMER_BLOCK_W]
    return table


def unet_structure(keys: Iterable[str]) -> tuple[int, int]:
    """(number of resolution levels, resnets per down level) of an original U-Net, from its un-prefixed keys."""
    keys = set(keys)
    inputs = _indices(keys, "input_blocks.")
    if not inputs or inputs != list(range(len(inputs))):
        raise CheckpointError(f"U-Net: input_blocks are not numbered 0..N-1: {inputs[:20]}")
    downsamplers = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in keys]
    levels = len(downsamplers) + 1
    per_level, remainder = divmod(len(inputs), levels)
    layers_per_block = per_level - 1
    expected_ops = [1 + i * per_level + layers_per_block for i in range(levels - 1)]
    if remainder or layers_per_block < 1 or downsamplers != expected_ops:
        raise CheckpointError(
            f"U-Net: unrecognised block layout: {len(inputs)} input blocks, downsamplers at {downsamplers}"
        )
    return levels, layers_per_block


def _unet_table(layout: _Layout) -> list[Rename]:
    """Name table for the U-Net, in un-prefixed original names -> diffusers names."""
    if layout.original:
        levels, lpb = unet_structure(layout.keys)
    else:
        levels, lpb = len(_indices(layout.keys, "down_blocks.")), len(_indices(layout.keys, "down_blocks.0.resnets."))
    table = _wb("input_blocks.0.0", "conv_in")
    table += _wb("time_embed.0", "time_embedding.linear_1") + _wb("time_embed.2", "time_embedding.linear_2")
    table += _wb("out.0", "conv_norm_out") + _wb("out.2", "conv_out")
    # input_blocks: [conv_in] then per level lpb x (resnet [, attention]) and, except at the last level, a downsampler.
    for i in range(levels):
        for j in range(lpb):
            block = f"input_blocks.{1 + i * (lpb + 1) + j}"
            table += _unet_resnet(layout, f"{block}.0", f"down_blocks.{i}.resnets.{j}")
            if layout.has(f"{block}.1", f"down_blocks.{i}.attentions.{j}"):
                table += _unet_attention(layout, f"{block}.1", f"down_blocks.{i}.attentions.{j}")
        if i < levels - 1:
            table += _wb(f"input_blocks.{1 + i * (lpb + 1) + lpb}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
    table += _unet_resnet(layout, "middle_block.0", "mid_block.resnets.0")
    table += _unet_attention(layout, "middle_block.1", "mid_block.attentions.0")
    table += _unet_resnet(layout, "middle_block.2", "mid_block.resnets.1")
    # output_blocks: per level (lpb + 1) x (resnet [, attention]); the last of each level but the final one ends
    # with an upsampler, placed after the attention when there is one (`.2.conv`), else right after the resnet.
    for i in range(levels):
        for j in range(lpb + 1):
            block = f"output_blocks.{i * (lpb + 1) + j}"
            table += _unet_resnet(layout, f"{block}.0", f"up_blocks.{i}.resnets.{j}")
            has_attention = layout.has(f"{block}.1", f"up_blocks.{i}.attentions.{j}", besides=f"{block}.1.conv")
            if has_attention:
                table += _unet_attention(layout, f"{block}.1", f"up_blocks.{i}.attentions.{j}")
            if i < levels - 1 and j == lpb:
                table += _wb(f"{block}.{2 if has_attention else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv")
    return table


# ------------------------------------------------------------------------------------------------------------- VAE


def original_unet_weight_names(diffusers_keys: Iterable[str]) -> dict[str, str]:
    """The original-layout (CompVis) name of each U-Net weight, by its diffusers name, for a U-Net of these diffusers
    keys: `input_blocks.1.1.proj_in.weight` for `down_blocks.0.attentions.0.proj_in.weight`, ... (LoRA files name
    modules either way). Only one-to-one renames are listed (no fused or split tensors)."""
    table = _unet_table(_Layout(frozenset(diffusers_keys), original=False))
    return {rule.targets[0]: rule.source for rule in table if len(rule.targets) == 1}


def _vae_resnet(layout: _Layout, src: str, dst: str) -> list[Rename]:
    table = _module(src, dst, _VAE_RESNET)
    if layout.has(f"{src}.nin_shortcut", f"{dst}.conv_shortcut"):
        table += _wb(f"{src}.nin_shortcut", f"{dst}.conv_shortcut")
    return table


def _vae_table(layout: _Layout) -> list[Rename]:
    """Name table for the VAE, in un-prefixed original names -> diffusers AutoencoderKL names."""
    levels = len(layout.indices("encoder.down", "encoder.down_blocks"))
    lpb = len(layout.indices("encoder.down.0.block", "encoder.down_blocks.0.resnets"))
    up_levels = len(layout.indices("decoder.up", "decoder.up_blocks"))
    up_lpb = len(layout.indices("decoder.up.0.block", f"decoder.up_blocks.{up_levels - 1}.resnets"))
    if not levels or not lpb or not up_levels or not up_lpb:
        raise CheckpointError("VAE: no encoder.down.N.block.M / decoder.up.N.block.M weights found")
    table = _wb("quant_conv", "quant_conv") + _wb("post_quant_conv", "post_quant_conv")
    for side in ("encoder", "decoder"):
        table += _wb(f"{side}.conv_in", f"{side}.conv_in") + _wb(f"{side}.conv_out", f"{side}.conv_out")
        table += _wb(f"{side}.norm_out", f"{side}.conv_norm_out")
        table += _vae_resnet(layout, f"{side}.mid.block_1", f"{side}.mid_block.resnets.0")
        table += _vae_resnet(layout, f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")
        for a, b in _VAE_ATTENTION.items():
            src, dst = f"{side}.mid.attn_1.{a}", f"{side}.mid_block.attentions.0.{b}"
            table.append(Rename(f"{src}.weight", (f"{dst}.weight",), _same if a == "norm" else _conv1x1_to_linear))
            table.append(Rename(f"{src}.bias", (f"{dst}.bias",)))
    for i in range(levels):
        for j in range(lpb):
            table += _vae_resnet(layout, f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            table += _wb(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    # The decoder's `up` list runs from the highest resolution (up.0) to the lowest; diffusers' up_blocks the other way.
    for n in range(up_levels):
        i = up_levels - 1 - n
        for j in range(up_lpb):
            table += _vae_resnet(layout, f"decoder.up.{n}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
        if n > 0:
            table += _wb(f"decoder.up.{n}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    return table


# ---------------------------------------------------------------------------------------------------- text encoders


def _clip_table(layout: _Layout) -> list[Rename]:
    """SD 1.x: Hugging Face CLIP already, names kept (the `text_model.` prefix is dropped by the caller's prefix)."""
    table = [
        Rename("embeddings.token_embedding.weight", ("embeddings.token_embedding.weight",)),
        Rename("embeddings.position_embedding.weight", ("embeddings.position_embedding.weight",)),
    ]
    table += _wb("final_layer_norm", "final_layer_norm")
    for n in layout.indices("encoder.layers", "encoder.layers"):
        table += _module(f"encoder.layers.{n}", f"encoder.layers.{n}", _CLIP_LAYER)
    return table


def _open_clip_block(n: int) -> list[Rename]:
    """One OpenCLIP residual block `transformer.resblocks.n` -> `encoder.layers.n`."""
    src, dst = f"transformer.resblocks.{n}", f"encoder.layers.{n}"
    table = _module(src, dst, _OPEN_CLIP_LAYER)
    attn = f"{dst}.self_attn"
    table.append(Rename(f"{src}.attn.in_proj_weight", tuple(f"{attn}.{p}_proj.weight" for p in "qkv"), _split_qkv))
    table.append(Rename(f"{src}.attn.in_proj_bias", tuple(f"{attn}.{p}_proj.bias" for p in "qkv"), _split_qkv))
    return table


def _open_clip_table(layout: _Layout) -> list[Rename]:
    """SD 2.x: OpenCLIP ViT-H/14 text tower -> CLIPTextModel names, without the unused last resblock."""
    table = [
        Rename("token_embedding.weight", ("embeddings.token_embedding.weight",)),
        Rename("positional_embedding", ("embeddings.position_embedding.weight",)),
    ]
    table += _wb("ln_final", "final_layer_norm")
    blocks = layout.indices("transformer.resblocks", "encoder.layers")
    if layout.original:
        # A file has one block more than the model runs: SD 2.x conditions on the penultimate layer.
        blocks = blocks[:-1]
    for n in blocks:
        table += _open_clip_block(n)
    return table


def _tables(layouts: Mapping[str, _Layout], sd2: bool) -> dict[str, list[Rename]]:
    """The three components' name tables (un-prefixed original names -> diffusers names)."""
    return {
        "unet": _unet_table(layouts["unet"]),
        "vae": _vae_table(layouts["vae"]),
        "text_encoder": (_open_clip_table if sd2 else _clip_table)(layouts["text_encoder"]),
    }


def _clip_prefix(keys: Iterable[str]) -> str:
    # Files written with older transformers lack the `text_model.` level.
    return CLIP + "text_model." if _has_prefix(keys, CLIP + "text_model.") else CLIP


# ------------------------------------------------------------------------------------------------------- detection


def _prefix_summary(keys: Iterable[str], limit: int = 8) -> str:
    counts = Counter(".".join(k.split(".")[:2]) for k in keys)
    shown = ", ".join(f"{p}.* ({n})" for p, n in counts.most_common(limit))
    return shown or "no keys at all"


def detect_model_type(state_dict: Mapping[str, Any]) -> str:
    """Which Stable Diffusion a single-file checkpoint holds: "sd1", "sd1_inpainting", "sd2" or "sd2_inpainting".

    SD 1.x has a Hugging Face CLIP text encoder (`cond_stage_model.transformer.*`, width 768), SD 2.x an OpenCLIP
    one (`cond_stage_model.model.transformer.resblocks.*`, width 1024); the U-Net's cross-attention width must match
    the text encoder's (checked from the shapes, so tiny test models pass too). Inpainting U-Nets take 9 input
    channels (latents, mask, masked-image latents) instead of 4.

    A file cannot tell epsilon- from v-prediction (SD 2.x 512-base vs 768-v share every shape): the caller decides.

    Raises:
      CheckpointError: SDXL, depth / upscaler U-Nets, or a file that is not Stable Diffusion, saying what was found.
    """
    keys = list(state_dict.keys())
    if _has_prefix(keys, "conditioner.embedders."):
        raise CheckpointError(
            "this looks like SDXL (keys conditioner.embedders.*), which is not supported; found "
            + _prefix_summary(keys)
        )
    conv_in = state_dict.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        raise CheckpointError(
            f"not a Stable Diffusion single-file checkpoint: no {UNET}input_blocks.0.0.weight; found "
            + _prefix_summary(keys)
        )
    has_clip = _has_prefix(keys, CLIP)
    has_open_clip = _has_prefix(keys, OPEN_CLIP + "transformer.resblocks.")
    if has_clip == has_open_clip:
        which = "both" if has_clip else "neither"
        raise CheckpointError(
            f"cannot tell SD 1.x from SD 2.x: {which} of {CLIP}* (CLIP) and {OPEN_CLIP}transformer.resblocks.* "
            f"(OpenCLIP) found; found " + _prefix_summary(keys)
        )
    family = "sd1" if has_clip else "sd2"
    token_key = (
        _clip_prefix(keys) + "embeddings.token_embedding.weight" if has_clip else OPEN_CLIP + "token_embedding.weight"
    )
    if token_key not in state_dict:
        raise CheckpointError(f"{family}: text encoder without a token embedding ({token_key} missing)")
    text_width = int(np.shape(state_dict[token_key])[1])
    context_keys = sorted(k for k in keys if k.startswith(UNET) and k.endswith("attn2.to_k.weight"))
    if not context_keys:
        raise CheckpointError(
            "U-Net without cross-attention (no attn2.to_k.weight): not a text-to-image Stable Diffusion"
        )
    context_dim = int(np.shape(state_dict[context_keys[0]])[1])
    if context_dim != text_width:
        raise CheckpointError(
            f"{family}: U-Net cross-attention width {context_dim} does not match the text encoder width {text_width}"
        )
    in_channels = int(np.shape(conv_in)[1])
    if in_channels == 4:
        return family
    if in_channels == 9:
        return family + "_inpainting"
    raise CheckpointError(
        f"{family}: U-Net with {in_channels} input channels is not supported (4 = text-to-image, 9 = inpainting; "
        "5 is the depth model, 7 the x4 upscaler)"
    )


# ----------------------------------------------------------------------------------------------------------- split


def _ema_key(key: str) -> str:
    """`model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`."""
    return EMA + key.removeprefix("model.").replace(".", "")


def sd2_v_prediction(path: Path, global_step: int | None) -> tuple[bool, str]:
    """Whether an SD 2.x single file predicts v (the 768-v models) or epsilon (the 512 base models), and why.

    The weights cannot tell. As the ecosystem decides: a same-name `.yaml` beside the checkpoint (the original
    inference configs) says `parameterization: "v"` or not; without one, diffusers' rule: epsilon only for the
    base model's `global_step` 875000, else v-prediction.
    """
    yaml_file = next((f for f in (path.with_suffix(".yaml"), path.with_suffix(".yml")) if f.is_file()), None)
    if yaml_file is not None:
        import yaml

        try:
            original = yaml.safe_load(yaml_file.read_text())
            params = original["model"]["params"]
        except (yaml.YAMLError, OSError, UnicodeDecodeError, KeyError, TypeError) as e:
            what = type(e).__name__
            raise CheckpointError(f"{yaml_file}: not an original Stable Diffusion config ({what})") from None
        if not isinstance(params, dict):
            raise CheckpointError(f"{yaml_file}: model.params is not a mapping")
        value = params.get("parameterization", "eps")
        return value == "v", f"{yaml_file.name} says parameterization: {value}"
    if global_step == 875000:
        return False, "no .yaml beside it; global_step 875000 is the SD 2.x base model's (--model_type overrides)"
    step = "no global_step" if global_step is None else f"global_step {global_step}"
    return True, f"no .yaml beside it and {step}: the SD 2.x 768-v rule (--model_type overrides)"


def _skip_reason(key: str, *, model_type: str, ema_in_use: bool, last_resblock: int | None) -> str | None:
    """Why a key of the file is deliberately not converted, or None if it must be converted."""
    if key in SCHEDULE_BUFFERS or key.startswith("posterior_"):
        return "DDPM schedule buffer (recomputed from the scheduler config)"
    if key.startswith(VAE + "loss."):
        return "VAE training loss (LPIPS / discriminator), unused for inference"
    if key in EMA_BOOKKEEPING:
        return "EMA bookkeeping (decay, update count)"
    if key.startswith(EMA) and not ema_in_use:
        return "EMA copy of the U-Net, not used (use_ema=False)"
    if key.startswith(UNET) and ema_in_use:
        return "non-EMA U-Net weights, superseded by the EMA copy (use_ema=True)"
    if key.startswith(CLIP) and key.endswith("embeddings.position_ids"):
        return "CLIP position_ids buffer (always arange)"
    if model_type.startswith("sd2"):
        if key in (OPEN_CLIP + "text_projection", OPEN_CLIP + "logit_scale"):
            return "OpenCLIP contrastive head, unused by Stable Diffusion"
        if key == OPEN_CLIP + "attn_mask":
            return "OpenCLIP causal mask buffer (rebuilt by the model)"
        if last_resblock is not None and key.startswith(f"{OPEN_CLIP}transformer.resblocks.{last_resblock}."):
            return "last OpenCLIP block, unused: SD 2.x conditions on the penultimate layer"
    return None


def _format_keys(title: str, keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{title} ({len(keys)}): " + ", ".join(keys[:limit]) + more


def split_original(
    state_dict: Mapping[str, np.ndarray], model_type: str, *, use_ema: bool = True
) -> dict[str, dict[str, np.ndarray]]:
    """Splits an original single-file checkpoint into diffusers-named "unet", "vae" and "text_encoder" state dicts.

    Args:
      state_dict: the file's tensors (see `torch_files.read_state_dict`), original names.
      model_type: one of MODEL_TYPES (see `detect_model_type`).
      use_ema: take the U-Net from the `model_ema.*` copy when the file has one.

    Returns:
      component -> (diffusers / transformers state-dict name -> numpy array, PyTorch layout, the file's dtype).
      The text encoder names lack the `text_model.` prefix (`encoder.layers.0.self_attn.q_proj.weight`).

    Raises:
      CheckpointError: keys the tables need but the file lacks, and keys neither used nor knowingly skipped.
    """
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"unknown model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    keys = set(state_dict.keys())
    sd2 = model_type.startswith("sd2")
    has_ema = any(k.startswith(EMA) and k not in EMA_BOOKKEEPING for k in keys)
    ema_in_use = use_ema and has_ema

    unet_keys = {k[len(UNET) :] for k in keys if k.startswith(UNET)}
    vae_keys = {k[len(VAE) :] for k in keys if k.startswith(VAE)}
    if not unet_keys:
        raise CheckpointError(f"no U-Net weights ({UNET}*) in the checkpoint; found " + _prefix_summary(keys))
    if not vae_keys:
        raise CheckpointError(f"no VAE weights ({VAE}*) in the checkpoint; found " + _prefix_summary(keys))
    text_prefix = OPEN_CLIP if sd2 else _clip_prefix(keys)
    text_keys = {k[len(text_prefix) :] for k in keys if k.startswith(text_prefix)}
    resblocks = _indices(text_keys, "transformer.resblocks.") if sd2 else []
    last_resblock = resblocks[-1] if resblocks else None

    unet_source = _ema_key if ema_in_use else (lambda k: k)
    layouts = {
        name: _Layout(frozenset(keys), original=True)
        for name, keys in (("unet", unet_keys), ("vae", vae_keys), ("text_encoder", text_keys))
    }
    prefixes = {"unet": UNET, "vae": VAE, "text_encoder": text_prefix}
    tables = {
        name: [dataclasses.replace(r, source=prefixes[name] + r.source) for r in table]
        for name, table in _tables(layouts, sd2).items()
    }
    tables["unet"] = [dataclasses.replace(r, source=unet_source(r.source)) for r in tables["unet"]]

    components: dict[str, dict[str, np.ndarray]] = {}
    used: set[str] = set()
    missing: list[str] = []
    for name, table in tables.items():
        out: dict[str, np.ndarray] = {}
        for rule in table:
            if rule.source in used:
                raise AssertionError(f"conversion table uses {rule.source} twice")
            if rule.source not in state_dict:
                missing.append(rule.source)
                continue
            used.add(rule.source)
            arrays = rule.transform(np.asarray(state_dict[rule.source]))
            for target, array in zip(rule.targets, arrays, strict=True):
                if target in out:
                    raise AssertionError(f"conversion table fills {name}.{target} twice")
                out[target] = array
        components[name] = out

    skipped: dict[str, str] = {}
    unexpected = []
    for key in keys - used:
        reason = _skip_reason(key, model_type=model_type, ema_in_use=ema_in_use, last_resblock=last_resblock)
        if reason is None:
            unexpected.append(key)
        else:
            skipped[key] = reason
    if missing or unexpected:
        parts = [f"{model_type} single-file checkpoint does not match the expected layout"]
        if missing:
            parts.append(_format_keys("missing keys", missing))
        if unexpected:
            parts.append(_format_keys("unexpected keys", unexpected))
        raise CheckpointError("; ".join(parts))
    for reason, count in Counter(skipped.values()).items():
        log.info("skipped %d keys: %s", count, reason)
    return components


# ------------------------------------------------------------------------------------------------------------ join


def join_original(components: Mapping[str, Mapping[str, np.ndarray]], model_type: str) -> dict[str, np.ndarray]:
    """The inverse of `split_original`: diffusers-named components -> one original single-file state dict.

    The same tables read the other way: built from the diffusers names found, each entry's targets become its
    source through the inverse transform (1x1 convolutions for the VAE attention, fused OpenCLIP q/k/v). The U-Net
    is written as `model.diffusion_model.*` (no EMA copy), the VAE as `first_stage_model.*`, the text encoder as
    `cond_stage_model.transformer.text_model.*` (SD 1.x) or `cond_stage_model.model.*` (SD 2.x). An SD 2.x file
    also gets the last OpenCLIP block, which Stable Diffusion never runs, as zeros (an identity block: its layer
    norms output zeros, so neither residual branch adds anything), because readers drop a file's last block. No
    schedule buffers are written: readers compute the schedule from the scheduler config.

    Args:
      components: {"unet", "vae", "text_encoder"} -> PyTorch-named, PyTorch-layout arrays, as `split_original`
        returns them (text encoder names without `text_model.`).
      model_type: one of MODEL_TYPES; sd1 or sd2 chooses the text encoder's layout.

    Returns:
      original name -> array (the given arrays themselves where no transform applies).

    Raises:
      ValueError: the components do not fit the original layout; lists the names the tables need and lack and the
        names no table entry takes.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    sd2 = model_type.startswith("sd2")
    layouts = {name: _Layout(frozenset(components[name]), original=False) for name in ("unet", "vae", "text_encoder")}
    prefixes = {"unet": UNET, "vae": VAE, "text_encoder": OPEN_CLIP if sd2 else CLIP + "text_model."}
    out: dict[str, np.ndarray] = {}
    missing: list[str] = []
    untaken: list[str] = []
    for name, table in _tables(layouts, sd2).items():
        arrays = components[name]
        left = set(arrays)
        for rule in table:
            lacking = [t for t in rule.targets if t not in arrays]
            if lacking:
                missing += [f"{name}.{t}" for t in lacking]
                continue
            left -= set(rule.targets)
            source = prefixes[name] + rule.source
            if source in out:
                raise AssertionError(f"conversion table writes {source} twice")
            out[source] = _INVERSE[rule.transform](*(np.asarray(arrays[t]) for t in rule.targets))
        untaken += [f"{name}.{k}" for k in left]
    if missing or untaken:
        parts = [f"the model does not fit the original {model_type} single-file layout"]
        if missing:
            parts.append(_format_keys("weights the layout needs and the model lacks", missing))
        if untaken:
            parts.append(_format_keys("weights the layout has no place for", untaken))
        raise ValueError("; ".join(parts))
    if sd2:
        layers = len(_indices(components["text_encoder"], "encoder.layers."))
        for rule, like in zip(_open_clip_block(layers), _open_clip_block(0), strict=True):
            out[OPEN_CLIP + rule.source] = np.zeros_like(out[OPEN_CLIP + like.source])
    return out


# --------------------------------------------------------------------------------------------------------- configs


def _shape(sd: Mapping[str, np.ndarray], key: str, component: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"{component}: cannot infer the config, {key} missing")
    return tuple(int(d) for d in np.shape(sd[key]))


def _heads_from_width(width: int, what: str) -> int:
    """Stable Diffusion's SD 2.x U-Net and both text encoders use 64-wide attention heads."""
    if width % 64:
        raise CheckpointError(
            f"{what}: width {width} is not a multiple of the standard 64-wide heads; pass the head count as an override"
        )
    return width // 64


def _unet_config(sd: Mapping[str, np.ndarray], model_type: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    levels = len(_indices(sd, "down_blocks."))
    lpb = len(_indices(sd, "down_blocks.0.resnets."))
    channels = [_shape(sd, f"down_blocks.{i}.resnets.0.conv1.weight", "unet")[0] for i in range(levels)]
    down_attention = [bool(_indices(sd, f"down_blocks.{i}.attentions.")) for i in range(levels)]
    up_attention = [bool(_indices(sd, f"up_blocks.{i}.attentions.")) for i in range(levels)]
    attn_prefix = "mid_block.attentions.0"
    depth = len(_indices(sd, f"{attn_prefix}.transformer_blocks."))
    sd2 = model_type.startswith("sd2")
    config: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": _shape(sd, "conv_in.weight", "unet")[1],
        "out_channels": _shape(sd, "conv_out.weight", "unet")[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "transformer_layers_per_block": depth,
        "cross_attention_dim": _shape(sd, f"{attn_prefix}.transformer_blocks.0.attn2.to_k.weight", "unet")[1],
        "use_linear_projection": len(_shape(sd, f"{attn_prefix}.proj_in.weight", "unet")) == 2,
        # Only matters numerically in half precision; the SD 2.x configs upcast attention softmax to float32.
        "upcast_attention": sd2,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "center_input_sample": False,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dual_cross_attention": False,
        "only_cross_attention": False,
    }
    if "attention_head_dim" not in overrides:
        # diffusers' (historically misnamed) `attention_head_dim` is the number of heads for these models.
        config["attention_head_dim"] = [_heads_from_width(c, "unet") for c in channels] if sd2 else 8
    config.update(overrides)
    return config


def _vae_config(sd: Mapping[str, np.ndarray], overrides: Mapping[str, Any]) -> dict[str, Any]:
    levels = len(_indices(sd, "encoder.down_blocks."))
    channels = [_shape(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", "vae")[0] for i in range(levels)]
    config: dict[str, Any] = {
        "_class_name": "AutoencoderKL",
        "in_channels": _shape(sd, "encoder.conv_in.weight", "vae")[1],
        "out_channels": _shape(sd, "decoder.conv_out.weight", "vae")[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": len(_indices(sd, "encoder.down_blocks.0.resnets.")),
        "latent_channels": _shape(sd, "decoder.conv_in.weight", "vae")[1],
        "act_fn": "silu",
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }
    config.update(overrides)
    return config


def _text_config(sd: Mapping[str, np.ndarray], model_type: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    vocab, hidden = _shape(sd, "embeddings.token_embedding.weight", "text_encoder")
    sd2 = model_type.startswith("sd2")
    config: dict[str, Any] = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _shape(sd, "encoder.layers.0.mlp.fc1.weight", "text_encoder")[0],
        "num_hidden_layers": len(_indices(sd, "encoder.layers.")),
        "max_position_embeddings": _shape(sd, "embeddings.position_embedding.weight", "text_encoder")[0],
        "hidden_act": "gelu" if sd2 else "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "pad_token_id": 1,
    }
    if vocab > 49407:
        # The CLIP BPE tokenizer's <|startoftext|> / <|endoftext|>; only the pooled output looks at eos.
        config.update(bos_token_id=49406, eos_token_id=49407)
    if "num_attention_heads" not in overrides:
        config["num_attention_heads"] = _heads_from_width(hidden, "text_encoder")
    config.update(overrides)
    return config


def infer_configs(
    components: Mapping[str, Mapping[str, np.ndarray]],
    model_type: str,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """diffusers / transformers config dicts for the components of `split_original`, sizes read from the shapes.

    Head counts cannot be read from shapes; the standard ones are used (SD 1.x U-Net: 8 heads per attention; SD 2.x
    U-Net and both text encoders: 64-wide heads, so heads = width // 64). Neither can the sample size (64 here; pass
    96 for SD 2.x 768-v), the prediction type (the scheduler's business) or `norm_num_groups` (32).

    Args:
      components: {"unet", "vae", "text_encoder"} -> diffusers-named arrays.
      model_type: one of MODEL_TYPES.
      overrides: component -> config entries that replace the inferred ones (e.g. tiny test models:
        {"unet": {"attention_head_dim": 2}, "text_encoder": {"num_attention_heads": 4}}).

    Returns:
      {"unet": UNet2DConditionModel config, "vae": AutoencoderKL config, "text_encoder": CLIPTextConfig dict}.
    """
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"unknown model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    overrides = overrides or {}
    return {
        "unet": _unet_config(components["unet"], model_type, overrides.get("unet", {})),
        "vae": _vae_config(components["vae"], overrides.get("vae", {})),
        "text_encoder": _text_config(components["text_encoder"], model_type, overrides.get("text_encoder", {})),
    }
