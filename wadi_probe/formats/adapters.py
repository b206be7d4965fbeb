"""Adapters merged onto a base checkpoint on the fly (filled in below)."""
from __future__ import annotations

import re

_ADAPTER_KEY = re.compile(r"(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|theta_a|theta_b|lorad_A|lorad_B)(\.|$)")


def looks_like_adapter(names: list[str]) -> bool:
    """True when most keys are LoRA/LoRaD factors rather than model weights."""
    hits = sum(1 for name in names if _ADAPTER_KEY.search(name))
    return bool(names) and hits >= len(names) / 2
