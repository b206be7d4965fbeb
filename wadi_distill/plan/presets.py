"""Uniform-rank plans: the paper's setup and its variants, one rank on every chosen layer."""

from __future__ import annotations

import math

from torch import nn

from wadi_distill.plan.models import backbone_param_count, weight_layers
from wadi_distill.lorad.config import adapter_param_count
from wadi_distill.plan.plan import Plan, PlanEntry
from wadi_probe.errors import WadiInputError

__all__ = ["PRESETS", "BLOCK_ROOTS", "plan_from_preset"]

PRESETS = ("paper", "paper-conv", "all-linear")
# UNet blocks; DiT blocks (Flux's double and single, SD3's joint, Qwen-Image, SANA); Z-Image's layers and refiners
BLOCK_ROOTS = ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "single_transformer_blocks",
               "layers", "noise_refiner", "context_refiner")


def plan_from_preset(model: nn.Module, rank: int, preset: str = "paper") -> Plan:
    """A uniform-rank plan.

    ``"paper"``: every ``nn.Linear`` inside ``down_blocks``/``mid_block``/``up_blocks`` (UNet) or the transformer
    blocks of :data:`BLOCK_ROOTS` (DiT) — SD1.5 at rank 256 gives 182 layers and 83,795,968 parameters.
    ``"paper-conv"``: the same plus the ``nn.Conv2d`` layers inside those blocks (beyond the paper).
    ``"all-linear"``: every ``nn.Linear`` of the model.
    """
    if preset not in PRESETS:
        raise WadiInputError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}.")
    if int(rank) < 1:
        raise WadiInputError(f"the rank must be at least 1, got {rank}.")
    kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d) if preset == "paper-conv" else (nn.Linear,)
    entries: list[PlanEntry] = []
    skipped: list[tuple[str, str]] = []
    for name, layer in weight_layers(model, (nn.Linear, nn.Conv2d)):
        shape = tuple(layer.weight.shape)
        in_blocks = name.split(".", 1)[0] in BLOCK_ROOTS
        wanted = isinstance(layer, kinds) and (in_blocks or preset == "all-linear")
        if wanted and math.prod(shape[1:]) >= 2:
            # The paper keeps one rank everywhere, even above a layer's full rank min(out, ⌊fan_in/2⌋)
            # (e.g. r=256 on 320×320): the counts it reports include those factors, so do we.
            entries.append(PlanEntry(name, int(rank), adapter_param_count(shape, int(rank)), shape))
        elif isinstance(layer, nn.Linear):
            skipped.append((name, "outside the down/mid/up or transformer blocks"))
    if not entries:
        raise WadiInputError(
            f"preset {preset!r} found no layer to adapt in {type(model).__name__} "
            "(expected down_blocks/mid_block/up_blocks or transformer_blocks)."
        )
    convs = sum(1 for _, layer in weight_layers(model, (nn.Conv2d,)))
    notes = [f"preset {preset}, rank {rank} on every layer"]
    if preset != "paper-conv" and convs:
        notes.append(f"{convs} Conv2d layers left frozen (the paper adapts Linear layers only)")
    above = [e.module for e in entries if e.rank > min(e.shape[0], math.prod(e.shape[1:]) // 2)]
    if above:
        notes.append(f"{len(above)} layers have rank {rank} above their full rank min(out, fan_in/2), as in the paper")
    return Plan(entries, source=f"preset:{preset}:r{rank}", notes=notes, skipped=skipped,
                model_class=type(model).__name__, backbone_params=backbone_param_count(model))
