"""Test helper: writes diffusers / transformers state dicts as an ORIGINAL single-file Stable Diffusion checkpoint.

The inverse of `sd_jax.convert.single_file.split_original`, written independently (per-key regular expressions, not
the converter's table) so that a round trip through both is a real check of the key layout.
"""

from __future__ import annotations

import re

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."

_UNET_RESNET_LEAF = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION_LEAF = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LEAF = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _count(keys, pattern: str) -> int:
    found = {m.group(1) for k in keys if (m := re.match(pattern, k))}
    return len(found)


def unet_to_original(unet_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel names -> `model.diffusion_model.*` names."""
    keys = list(unet_sd)
    lpb = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    up_has_attention = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in unet_sd.items():
        new = None
        if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key):
            i, j, leaf, p = int(m[1]), int(m[2]), m[3], m[4]
            new = f"input_blocks.{1 + i * (lpb + 1) + j}.0.{_UNET_RESNET_LEAF[leaf]}.{p}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + i * (lpb + 1) + j}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
            i = int(m[1])
            new = f"input_blocks.{1 + i * (lpb + 1) + lpb}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)\.(weight|bias)", key):
            new = f"middle_block.{0 if m[1] == '0' else 2}.{_UNET_RESNET_LEAF[m[2]]}.{m[3]}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key):
            i, j, leaf, p = int(m[1]), int(m[2]), m[3], m[4]
            new = f"output_blocks.{i * (lpb + 1) + j}.0.{_UNET_RESNET_LEAF[leaf]}.{p}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{i * (lpb + 1) + j}.1.{rest}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
            i = int(m[1])
            slot = 2 if i in up_has_attention else 1
            new = f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.conv.{m[2]}"
        else:
            fixed = {
                "conv_in": "input_blocks.0.0",
                "time_embedding.linear_1": "time_embed.0",
                "time_embedding.linear_2": "time_embed.2",
                "conv_norm_out": "out.0",
                "conv_out": "out.2",
            }
            module, p = key.rsplit(".", 1)
            new = f"{fixed[module]}.{p}"
        out[UNET + new] = value
    return out


def vae_to_original(vae_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> `first_stage_model.*` names (attention linears back to 1x1 convs)."""
    levels = _count(vae_sd, r"decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, value in vae_sd.items():
        new = key
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{m[4]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key):
            n = levels - 1 - int(m[1])
            new = f"decoder.up.{n}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{m[4]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{m[4]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION_LEAF[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                value = value[:, :, None, None]
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        out[VAE + new] = value
    return out


def clip_to_original(text_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel names -> SD 1.x `cond_stage_model.transformer.text_model.*` (with position_ids)."""
    out = {}
    for key, value in text_sd.items():
        out["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    n_pos = text_sd_value(text_sd, "embeddings.position_embedding.weight").shape[0]
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    return out


def text_sd_value(text_sd, name):
    return text_sd[name] if name in text_sd else text_sd["text_model." + name]


def open_clip_to_original(text_sd: dict[str, torch.Tensor], *, seed: int = 7) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel names -> SD 2.x OpenCLIP `cond_stage_model.model.*`.

    Adds what a real SD 2.x file has and the converter must skip: one more (unused) final resblock, the
    `text_projection` matrix and `logit_scale`.
    """
    prefix = "cond_stage_model.model."
    sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    out = {
        prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["final_layer_norm.bias"],
    }
    layers = _count(sd, r"encoder\.layers\.(\d+)\.")
    for n in range(layers):
        src, dst = f"encoder.layers.{n}", f"{prefix}transformer.resblocks.{n}"
        for p in ("weight", "bias"):
            qkv = [sd[f"{src}.self_attn.{x}_proj.{p}"] for x in "qkv"]
            out[f"{dst}.attn.in_proj_{p}"] = torch.cat(qkv, dim=0)
            for a, b in _OPEN_CLIP_LEAF.items():
                out[f"{dst}.{b}.{p}"] = sd[f"{src}.{a}.{p}"]
    generator = torch.Generator().manual_seed(seed)
    width = sd["embeddings.token_embedding.weight"].shape[1]
    extra = f"{prefix}transformer.resblocks.{layers}"
    for name, value in list(out.items()):
        if name.startswith(f"{prefix}transformer.resblocks.0."):
            out[extra + name.removeprefix(f"{prefix}transformer.resblocks.0")] = torch.randn(
                value.shape, generator=generator
            )
    out[prefix + "text_projection"] = torch.randn((width, width), generator=generator)
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    return out


def schedule_buffers(steps: int = 1000) -> dict[str, torch.Tensor]:
    """The DDPM buffers that original checkpoints carry (scaled-linear schedule), plus `logvar`."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": betas * (1 - prev) / (1 - alphas_cumprod),
        "posterior_log_variance_clipped": (betas * (1 - prev) / (1 - alphas_cumprod)).clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        "logvar": torch.zeros(steps),
    }
    return {k: v.float() for k, v in buffers.items()}


def original_state_dict(unet_sd, vae_sd, text_sd, model_type: str, *, ema: bool = False) -> dict[str, torch.Tensor]:
    """The whole original single-file state dict. With `ema`, EMA copies hold the U-Net weights + 1."""
    sd = {}
    unet = unet_to_original(unet_sd)
    sd.update(unet)
    if ema:
        for key, value in unet.items():
            sd["model_ema." + key.removeprefix("model.").replace(".", "")] = value + 1.0
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    sd.update(vae_to_original(vae_sd))
    sd["first_stage_model.loss.logvar"] = torch.zeros(())
    sd.update(open_clip_to_original(text_sd) if model_type.startswith("sd2") else clip_to_original(text_sd))
    sd.update(schedule_buffers())
    # Shared storage (e.g. tied or sliced tensors) would upset safetensors; each entry gets its own contiguous copy.
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def write_original_single_file(unet_sd, vae_sd, text_sd, model_type: str, path, *, ema: bool = False) -> None:
    """Writes an original-layout checkpoint: `.safetensors` flat, `.ckpt` as a Lightning-style {"state_dict": ...}."""
    sd = original_state_dict(unet_sd, vae_sd, text_sd, model_type, ema=ema)
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, path)
    else:
        torch.save({"state_dict": sd, "global_step": 470000, "epoch": 3}, path)
