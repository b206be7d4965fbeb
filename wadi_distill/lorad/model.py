"""LoRaD on a whole model: inject adapters, switch between them, merge, unmerge and unload.

The layer math is in :mod:`wadi_distill.lorad.layer`; this module only finds layers by their module path and
replaces them by wrappers (or back). What to inject comes from a :class:`~wadi_distill.lorad.config.LoRaDConfig`,
anything else that lists its ranks with ``ranks()`` (a plan, an adapter read from disk) or a plain {module: rank}
mapping.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping, Protocol, Union

import torch
from torch import nn

from wadi_distill.lorad.config import LoRaDConfig
from wadi_distill.lorad.layer import LoRaDConv2d, LoRaDLayer, LoRaDLinear
from wadi_probe.errors import WadiInputError

__all__ = [
    "lorad_layers",
    "adapter_names",
    "layers_with_adapter",
    "inject_lorad",
    "set_active_adapter",
    "use_adapter",
    "adapter_disabled",
    "lorad_parameters",
    "lorad_param_count",
    "merge_lorad",
    "unmerge_lorad",
    "delete_adapter",
    "remove_lorad",
]

def lorad_layers(model: nn.Module) -> dict[str, LoRaDLayer]:
    """Every wrapped layer of ``model`` by its module path (the path of the layer it replaced)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRaDLayer)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present anywhere in ``model``, in first-seen order."""
    seen: dict[str, None] = {}
    for layer in lorad_layers(model).values():
        for name in layer.specs:
            seen.setdefault(name, None)
    return list(seen)


class Ranked(Protocol):
    """Anything that says which layers get which rank: a LoRaDConfig, a plan, an adapter read from disk."""

    def ranks(self) -> Mapping[str, int]: ...


Ranks = Union[LoRaDConfig, Ranked, Mapping[str, int], Iterable]


def _plan_ranks(plan: Ranks) -> dict[str, int]:
    if hasattr(plan, "ranks"):
        return {str(k): int(v) for k, v in plan.ranks().items()}
    if isinstance(plan, Mapping):
        return {str(k): int(v) for k, v in plan.items()}
    ranks: dict[str, int] = {}
    for item in plan:
        module, rank = (item.module, item.rank) if hasattr(item, "module") else item
        ranks[str(module)] = int(rank)
    return ranks


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def inject_lorad(
    model: nn.Module,
    plan: Ranks,
    *,
    adapter_name: str = "default",
    init: str | None = None,
    dtype: torch.dtype = torch.float32,
    kind: str | None = None,
    scale: float | None = None,
    activate: bool = True,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Add adapter ``adapter_name`` to every layer of ``plan`` (a LoRaDConfig, a Plan, or a {module: rank} mapping).

    ``kind``, ``init`` and ``scale`` default to the config's ``kind``, ``init`` and ``lora_scale`` when ``plan``
    is a :class:`LoRaDConfig`, else to ``"lorad"``, ``"zeros_xavier"`` and 1.

    Plain ``nn.Linear`` / ``nn.Conv2d`` layers are replaced in place by :class:`LoRaDLinear` /
    :class:`LoRaDConv2d` (their base parameters frozen); layers already wrapped get one more adapter. Adapter
    parameters are created in ``dtype`` (fp32 by default, also for fp16/bf16 bases) on the layer's device.
    With ``activate`` the new adapter becomes the active one on those layers. Returns the module names adapted.
    """
    config = plan if isinstance(plan, LoRaDConfig) else LoRaDConfig()
    kind = config.kind if kind is None else kind
    init = config.init if init is None else init
    scale = config.lora_scale if scale is None else scale
    ranks = _plan_ranks(plan)
    modules = dict(model.named_modules())
    missing = [m for m in ranks if m not in modules]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WadiInputError(f"the model has no module called {shown}; was the plan made for another model?")
    for module_name in ranks:
        m = modules[module_name]
        if not isinstance(m, (LoRaDLayer, nn.Linear, nn.Conv2d)):
            raise WadiInputError(
                f"module {module_name} is a {type(m).__name__}; LoRaD adapts only nn.Linear and nn.Conv2d layers."
            )
        if isinstance(m, LoRaDLayer) and adapter_name in m.specs:
            raise WadiInputError(f"module {module_name} already has an adapter called {adapter_name!r}.")
    adapted: list[str] = []
    for module_name, rank in ranks.items():
        m = modules[module_name]
        if not isinstance(m, LoRaDLayer):
            m = LoRaDLinear(m) if isinstance(m, nn.Linear) else LoRaDConv2d(m)
            _set_submodule(model, module_name, m)
        m.add_adapter(adapter_name, rank, kind=kind, init=init, dtype=dtype, scale=scale, generator=generator)
        if activate:
            m.set_active(adapter_name)
        adapted.append(module_name)
    return adapted


def layers_with_adapter(model: nn.Module, name: str) -> list[nn.Module]:
    """The LoRaD layers that hold adapter ``name``, in model order; refuses a name no layer has."""
    layers = [layer for layer in lorad_layers(model).values() if name in layer.specs]
    if not layers:
        raise WadiInputError(f"the model has no adapter called {name!r} (it has: {', '.join(adapter_names(model)) or 'none'}).")
    return layers


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Use adapter ``name`` on every layer that has it (the others run plain); ``None`` gives the plain base."""
    layers = lorad_layers(model)
    if name is not None:
        layers_with_adapter(model, name)  # refuses an unknown name
    for layer in layers.values():
        layer.active_adapter = name if name is not None and name in layer.specs else None


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """Run the body with adapter ``name`` active (``None``: the plain teacher), then restore what was active."""
    layers = lorad_layers(model)
    saved = {path: layer.active_adapter for path, layer in layers.items()}
    set_active_adapter(model, name)
    try:
        yield model
    finally:
        for path, layer in layers.items():
            layer.active_adapter = saved[path]


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body as the plain base model (the teacher), then restore the active adapters."""
    with use_adapter(model, None):
        yield model


def lorad_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The trainable parameters of adapter ``adapter_name`` (both factors, every layer), in model order."""
    params: list[nn.Parameter] = []
    for layer in layers_with_adapter(model, adapter_name):
        for store in (layer.lorad_A, layer.lorad_B, layer.lora_A, layer.lora_B):
            if adapter_name in store:
                params.append(store[adapter_name])
    return params


def lorad_param_count(model: nn.Module, adapter_name: str) -> int:
    """Number of trainable numbers in adapter ``adapter_name``, counted from its factors' sizes.

    The same as Σ :func:`~wadi_distill.lorad.config.adapter_param_count` over its layers, which counts without a
    model.
    """
    return sum(p.numel() for p in lorad_parameters(model, adapter_name))


def merge_lorad(model: nn.Module, adapter_name: str) -> None:
    """Merge adapter ``adapter_name`` into the base weights of every layer that has it (originals are kept)."""
    for layer in layers_with_adapter(model, adapter_name):
        layer.merge(adapter_name)


def unmerge_lorad(model: nn.Module) -> None:
    """Restore every merged layer's original weight bit-for-bit."""
    for layer in lorad_layers(model).values():
        layer.unmerge()


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Drop adapter ``adapter_name`` from every layer (wrappers stay, even when left without adapters)."""
    for layer in layers_with_adapter(model, adapter_name):
        layer.delete_adapter(adapter_name)


def remove_lorad(model: nn.Module, *, merge: bool, adapter_name: str | None = None) -> nn.Module:
    """Replace every wrapper by its plain base layer and return ``model`` (changed in place).

    With ``merge=True`` the base layers keep the weights of ``adapter_name`` (default: whatever is merged,
    else the active adapter) — a plain diffusers model that loads with ``strict=True``. With ``merge=False``
    the original weights come back bit-for-bit.
    """
    for path, layer in lorad_layers(model).items():
        if merge:
            name = adapter_name or layer.merged_adapter or layer.active_adapter
            if name is not None and name in layer.specs:
                layer.merge(name)
            elif layer.merged_adapter is not None:
                layer.unmerge()
            layer._original_weight = None
            layer.merged_adapter = None
        else:
            layer.unmerge()
        for n, p in layer.base_layer.named_parameters():
            p.requires_grad_(layer._base_requires_grad.get(n, True))
        _set_submodule(model, path, layer.base_layer)
    return model
