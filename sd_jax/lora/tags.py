"""AUTOMATIC1111's extra-network tags in prompts: `<lora:NAME>`, `<lora:NAME:WEIGHT>`, `<lora:NAME:TE:UNET>`.

A tag is `<TYPE:ARG:ARG...>`; every tag leaves the prompt text before it is tokenized (the text around it is kept as
it is, spaces included, as the web UI does). An argument `key=value` is named, any other is positional:

    <lora:NAME>               both weights 1
    <lora:NAME:W>             text encoder and U-Net weight W
    <lora:NAME:TE:UNET>       the text encoder's weight TE, the U-Net's UNET
    <lora:NAME:te=0.5:unet=1> the same by name

`lyco` is read as `lora` (the LyCORIS extension's tag for the same files). A fourth positional argument or `dyn=`
(DyLoRA's rank cut) and any other tag type are one-line errors: sd_jax does not silently ignore part of a prompt.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable

# The web UI's pattern: a word, a colon, then anything but `>`.
_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_TAG_TYPES = ("lora", "lyco")


@dataclasses.dataclass(frozen=True)
class LoRAUse:
    """One LoRA of a request: a name (in the LoRA folder) or a file path, and its weights per component."""

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0

    def tag(self) -> str:
        """The prompt tag that asks for this use."""
        weights = _number(self.te_weight)
        if self.unet_weight != self.te_weight:
            weights += f":{_number(self.unet_weight)}"
        return f"<lora:{self.name}:{weights}>"


def _number(value: float) -> str:
    return f"{value:g}" if float(value).is_integer() else repr(float(value))


def _weight(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{tag}: {text!r} is not a weight (a number)") from None
    if not math.isfinite(value):
        raise ValueError(f"{tag}: weight {text!r} is not finite")
    return value


def parse_tag(kind: str, arguments: str) -> LoRAUse:
    """One tag's LoRA use from its type and its text after the first colon (`NAME:W...`)."""
    tag = f"<{kind}:{arguments}>"
    if kind not in LORA_TAG_TYPES:
        raise ValueError(f"{tag}: sd_jax reads no {kind!r} extra networks (only <lora:NAME:WEIGHT>)")
    positional, named = [], {}
    for item in arguments.split(":"):
        key, sep, value = item.partition("=")
        if sep:
            named[key.strip()] = value.strip()
        else:
            positional.append(item.strip())
    if not positional or not positional[0]:
        raise ValueError(f"{tag}: no LoRA name")
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown or len(positional) > 3:
        what = f"argument {unknown[0]}=" if unknown else "a fourth argument"
        raise ValueError(f"{tag}: {what} is not supported (give NAME, NAME:WEIGHT or NAME:TE:UNET)")
    te = _weight(named.get("te", positional[1] if len(positional) > 1 else "1"), tag)
    unet = _weight(named.get("unet", positional[2] if len(positional) > 2 else str(te)), tag)
    return LoRAUse(positional[0], te, unet)


def extract(text: str) -> tuple[str, list[LoRAUse]]:
    """A prompt without its tags, and the LoRA uses its tags ask for (in order). Raises a one-line ValueError for
    a malformed or unsupported tag."""
    uses: list[LoRAUse] = []

    def found(match: re.Match) -> str:
        uses.append(parse_tag(match.group(1), match.group(2)))
        return ""

    return _TAG.sub(found, text), uses


def merge(uses: Iterable[LoRAUse]) -> tuple[LoRAUse, ...]:
    """Uses in order of first mention; a name given twice keeps its last weights (one LoRA is applied once)."""
    by_name: dict[str, LoRAUse] = {}
    for use in uses:
        by_name.pop(use.name, None)
        by_name[use.name] = use
    return tuple(by_name.values())
