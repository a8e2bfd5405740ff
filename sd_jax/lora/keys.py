"""LoRA key tables: the names LoRA files give their weights -> the NNX module paths of our models.

A LoRA weight's key has three parts: the component, the module and the role (down, up or alpha).

  kohya / AUTOMATIC1111        lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight   (.lora_up.weight, .alpha)
                               lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight
                               lora_unet_input_blocks_1_1_proj_in.lora_down.weight             (original-SD names)
  PEFT (diffusers >= 0.24)     unet.down_blocks.0.attentions.0.proj_in.lora_A.weight            (.lora_B.weight)
                               text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight
  older diffusers              unet.down_blocks.0...attn1.processor.to_q_lora.down.weight       (to_out_lora = to_out.0)
                               ...attn1.to_q.lora.down.weight, text_encoder...mlp.fc1.lora_linear_layer.down.weight
  PEFT, other wrappers         base_model.model.<U-Net module>.lora_A.weight, diffusion_model.input_blocks.1.1...

kohya writes module paths with every `.` turned into `_`, which is ambiguous (`down_blocks_0` or `down.blocks.0`?), so
names are never parsed: `module_table` lists every module of the actual model that has a `kernel` (Linear and Conv
layers), under its dotted name, its underscored name and, for the U-Net, the original-SD (CompVis) names of the
converter's tables; a LoRA module name is looked up there. The text encoder has no `text_model.` level
(`sd_jax.convert.params.clip_state_dict_for_flax`), so that prefix is dropped from LoRA names before the look-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from flax import nnx

from sd_jax.convert.params import ConversionError, path_to_name, torch_name
from sd_jax.convert.single_file import original_unet_weight_names
from sd_jax.convert.torch_files import CheckpointError

COMPONENTS = ("text_encoder", "unet")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
DOTTED_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder"}
# Prefixes of SDXL's second text encoder (kohya te1/te2, diffusers text_encoder_2): a model sd_jax does not run.
SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")
# PeftModel.save_pretrained wraps the model's own names in these.
PEFT_WRAPPER = "base_model.model."
# ComfyUI-style files name U-Net modules as the original single file does, under this prefix.
ORIGINAL_UNET = "diffusion_model."
# Bundled textual-inversion embeddings (AUTOMATIC1111's `bundle_emb.<name>.*`): not LoRA weights.
BUNDLED_EMBEDDINGS = "bundle_emb."

# Key suffix -> (role, naming). Checked in order; "old" marks the attention-processor names of older diffusers
# (`to_q_lora`), whose module names need `_OLD_PROCESSOR_NAMES`.
_ROLE_SUFFIXES = (
    (".lora_down.weight", "down", "kohya"),
    (".lora_up.weight", "up", "kohya"),
    (".lora_A.weight", "down", "dotted"),
    (".lora_B.weight", "up", "dotted"),
    (".lora_linear_layer.down.weight", "down", "dotted"),
    (".lora_linear_layer.up.weight", "up", "dotted"),
    (".lora.down.weight", "down", "dotted"),
    (".lora.up.weight", "up", "dotted"),
    ("_lora.down.weight", "down", "old"),
    ("_lora.up.weight", "up", "old"),
    (".alpha", "alpha", "any"),
)
# Older diffusers attention processors: `<attention>.processor.to_q_lora` -> the projection's own name.
_OLD_PROCESSOR_NAMES = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
# Weight kinds of LyCORIS and friends that are not a plain low-rank product: (marker in the last two segments of a
# key, with a leading dot, what it is).
UNSUPPORTED_KINDS = (
    (".hada_", "LoHa (hada_*)"),
    (".lokr_", "LoKr (lokr_*)"),
    (".lora_mid.", "Tucker / CP-decomposed LoCon (lora_mid)"),
    (".dora_scale", "DoRA (dora_scale)"),
    (".lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
    (".oft_", "OFT (oft_*)"),
    (".diff_b", "full weight difference (LyCORIS 'full', diff)"),
    (".w_norm", "norm-layer LyCORIS module (w_norm)"),
    (".a1.weight", "GLoRA (a1/a2/b1/b2)"),
)


@dataclasses.dataclass(frozen=True)
class KeyParts:
    """What one key of a LoRA file names.

    Attributes:
      component: "unet" or "text_encoder".
      module: the module's name as the file spells it, component prefix removed: underscored for kohya files
        (`down_blocks_0_attentions_0_proj_in`), dotted otherwise (`down_blocks.0.attentions.0.proj_in`); a text
        encoder's `text_model` level is kept (the look-up drops it).
      role: "down" (A, (rank, in[, kh, kw])), "up" (B, (out, rank[, 1, 1])) or "alpha" (a scalar).
      kohya: underscored names (resolved only through the model's own module list).
    """

    component: str
    module: str
    role: str
    kohya: bool


def unsupported_kind(key: str) -> str | None:
    """The LyCORIS (or DoRA) weight kind a key belongs to when it is not a plain LoRA weight, else None."""
    tail = "." + ".".join(key.split(".")[-2:])
    if tail.endswith(".diff"):
        tail += "_b"
    for marker, kind in UNSUPPORTED_KINDS:
        if marker in tail:
            return kind
    return None


def parse_key(key: str) -> KeyParts | None:
    """Splits a LoRA file's key into component, module and role; None when the key is no LoRA weight we know.

    Raises:
      ValueError: a key of SDXL's second text encoder (one line, naming the key).
    """
    if key.startswith(SDXL_PREFIXES):
        raise ValueError(f"key {key!r} belongs to SDXL's second text encoder: SDXL LoRAs are not supported")
    found = next((entry for entry in _ROLE_SUFFIXES if key.endswith(entry[0])), None)
    if found is None:
        return None
    suffix, role, naming = found
    module = key[: -len(suffix)]
    for prefix, component in KOHYA_PREFIXES.items():
        if module.startswith(prefix) and "." not in module and naming in ("kohya", "any"):
            return KeyParts(component, module[len(prefix) :], role, kohya=True)
    if naming == "kohya":
        return None
    module = module.removeprefix(PEFT_WRAPPER)
    component = "text_encoder" if module.startswith("text_model.") else "unet"
    for prefix, name in DOTTED_PREFIXES.items():
        if module.startswith(prefix):
            component, module = name, module[len(prefix) :].removeprefix(PEFT_WRAPPER)
            break
    if component == "unet":
        module = module.removeprefix(ORIGINAL_UNET)
    parts = [p for p in module.split(".") if p != "processor"]
    if naming == "old":
        renamed = _OLD_PROCESSOR_NAMES[component].get(parts[-1])
        if renamed is None:
            return None
        parts[-1:] = renamed.split(".")
    if not parts or not all(parts):
        return None
    return KeyParts(component, ".".join(parts), role, kohya=False)


@dataclasses.dataclass(frozen=True)
class ModuleTable:
    """The LoRA-able modules of one component (those with a `kernel`: Linear and Conv layers) by every name a LoRA
    file may give them.

    Attributes:
      kernels: module path (`('down_blocks', 0, 'resnets', 0, 'conv1')`) -> its kernel's shape, NNX layout
        ((in, out) or (kh, kw, in, out)).
      names: dotted, underscored and (U-Net) original-SD names -> module path; None for a name two modules share.
    """

    kernels: Mapping[tuple, tuple[int, ...]]
    names: Mapping[str, tuple | None]

    def find(self, component: str, name: str, kohya: bool) -> tuple | None:
        """The module path a LoRA module name (`KeyParts.module`) means, or None when the model has no such module
        (or two)."""
        if component == "text_encoder":
            name = name.removeprefix("text_model_" if kohya else "text_model.")
        return self.names.get(name)


def _add_name(names: dict[str, tuple | None], name: str, path: tuple) -> None:
    if name in names and names[name] != path:
        names[name] = None  # two modules spell the same: refuse rather than guess
    else:
        names[name] = path


def _original_unet_names(state: nnx.State, kernels: Mapping[tuple, tuple[int, ...]]) -> dict[str, tuple]:
    """Original-SD module names (`input_blocks.1.1.proj_in`) -> module paths, from the converter's U-Net table."""
    try:
        originals = original_unet_weight_names(torch_name(path) for path, _ in nnx.to_flat_state(state))
    except (CheckpointError, ConversionError, ValueError, IndexError):
        return {}  # not a Stable Diffusion U-Net layout: no original names
    by_dotted = {path_to_name(path): path for path in kernels}
    out = {}
    for target, source in originals.items():
        if source.endswith(".weight"):
            path = by_dotted.get(target.removesuffix(".weight"))
            if path is not None:
                out[source.removesuffix(".weight")] = path
    return out


def module_table(component: str, state: nnx.State) -> ModuleTable:
    """Every LoRA-able module of one component's state (real or abstract, as `nnx.eval_shape` gives it)."""
    kernels = {}
    for path, variable in nnx.to_flat_state(state):
        if path[-1] == "kernel":
            kernels[tuple(path[:-1])] = tuple(variable.get_value().shape)
    names: dict[str, tuple | None] = {}
    for path in kernels:
        _add_name(names, path_to_name(path), path)
    for path in kernels:
        _add_name(names, "_".join(str(p) for p in path), path)
    if component == "unet":
        for original, path in _original_unet_names(state, kernels).items():
            _add_name(names, original, path)
            _add_name(names, original.replace(".", "_"), path)
    return ModuleTable(kernels, names)
