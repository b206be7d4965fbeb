"""PEFT LoRA / DoRA students for the VSD loop: the baselines LoRaD is compared against.

The distiller's own student kinds are LoRaD, the project's LoRA and full fine-tuning. For an outside baseline the
quality benchmark also trains students whose adapters come from the ``peft`` library itself
(``LoraConfig(use_dora=False|True)``), so that "LoRA" and "DoRA" mean exactly what their reference implementation
computes. :class:`~wadi_distill.vsd.students.PeftStudent` is that student kind in the VSD loop (teacher and fake
score share the frozen base; the student is its own copy, frozen, with the PEFT adapter injected, so only the
adapter trains); this module holds the PEFT-side functions it uses.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from wadi_probe.errors import WadiInputError

PEFT_KINDS = ("lora", "dora")


def rank_for_budget(shapes: list[tuple[int, ...]], budget: int, kind: str) -> int:
    """The uniform rank whose parameter count (``kind`` in lora, dora, lorad) comes closest to ``budget``."""
    from wadi_distill.lorad.config import adapter_param_count

    def count(rank: int) -> int:
        return sum(adapter_param_count(s, rank, kind) for s in shapes)

    return min(range(1, 1025), key=lambda r: (abs(count(r) - budget), r))


def inject_peft_student(model: nn.Module, modules: list[str], rank: int, kind: str, *, alpha: float | None = None,
                        seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    """Freeze ``model`` and inject a PEFT LoRA/DoRA adapter (rank ``rank``) into ``modules`` (exact names).

    Returns the adapter's (name, parameter) pairs, the only trainable ones. ``alpha`` defaults to the rank
    (scale 1), the convention of diffusers' LoRA training scripts.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if kind not in PEFT_KINDS:
        raise WadiInputError(f"PEFT student kind must be lora or dora, not {kind!r}.")
    if not modules:
        raise WadiInputError("Name at least one layer for the PEFT adapter.")
    model.requires_grad_(False)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                        target_modules=list(modules), use_dora=(kind == "dora"), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        inject_adapter_in_model(config, model)
    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    for _, p in named:
        p.requires_grad_(True)
    return named


@torch.no_grad()
def merged_peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain state dict (the base model's own keys) of ``model`` with its PEFT adapter merged in.

    Works on a copy: the trained model keeps its adapter.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = merged.get_submodule(parent_name) if parent_name else merged
            setattr(parent, child, module.get_base_layer())
    return {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
