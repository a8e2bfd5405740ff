"""LoRA: reading kohya / AUTOMATIC1111 and diffusers / PEFT files and adding them to a model's weights as data.

    from sd_jax.lora import ActiveLoRA, apply_loras, read_lora

    lora = read_lora("style.safetensors")
    pipe.states = apply_loras(base_states, [ActiveLoRA(lora, te_weight=1.0, unet_weight=0.7)])

`files` reads a file into low-rank pairs (`LoRAFile`), `keys` maps the names files use onto our module paths, and
`apply` checks a file against a model and adds scale * up @ down to its kernels outside the compiled program, so
changing LoRAs or weights never recompiles. `short_hash` is AUTOMATIC1111's LoRA hash for the images' infotext.
"""

from sd_jax.lora.apply import ActiveLoRA, apply_loras, check_lora, module_delta
from sd_jax.lora.files import LORA_SUFFIXES, LoRAError, LoRAFile, LoRAModule, read_lora, short_hash

__all__ = [
    "LORA_SUFFIXES",
    "ActiveLoRA",
    "LoRAError",
    "LoRAFile",
    "LoRAModule",
    "apply_loras",
    "check_lora",
    "module_delta",
    "read_lora",
    "short_hash",
]
