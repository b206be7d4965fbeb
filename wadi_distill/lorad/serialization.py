"""Adapter folders: save a model's adapter, read one back (the project's own or an official WaDi checkpoint).

The project's own format is a folder with

* ``adapter.safetensors`` — the factors, keyed ``<module>.lorad_A`` (out, r) and ``<module>.lorad_B``
  (r, ⌊fan_in/2⌋) (``<module>.lora_A`` (r, fan_in) / ``.lora_B`` (out, r) for a LoRA adapter), in fp32;
* ``adapter_config.json`` — a :class:`~wadi_distill.lorad.config.LoRaDConfig` (ranks, kind, layer shapes and a
  signature of the base model's weight shapes, so that loading onto a different base is refused by name).

Official WaDi checkpoints store A and B as ``<module path>.theta_a`` / ``.theta_b`` (in either order); they are
read from safetensors or from a torch file with ``weights_only=True`` (never unpickling code). Every file goes
through the project's one adapter parser, :func:`wadi_probe.io.formats.adapters.read_adapter`, which also puts
official factors the right way round against the base.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from wadi_distill.lorad.config import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRaDConfig
from wadi_distill.lorad.layer import LoRaDLayer
from wadi_distill.lorad.model import inject_lorad, lorad_layers
from wadi_probe.errors import WadiInputError
from wadi_probe.io.atomic import atomic_path, write_json_atomic
from wadi_probe.io.formats import adapters as adapter_files

__all__ = [
    "ADAPTER_WEIGHTS",
    "ADAPTER_CONFIG",
    "AdapterFile",
    "base_signature",
    "model_shapes",
    "save_adapter",
    "read_adapter",
    "load_adapter",
    "load_official_thetas",
]


# ------------------------------------------------------------------------------------------------ signature
def _base_key(name: str) -> str:
    return name.replace(".base_layer.", ".")


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the base model (wrappers and adapter factors looked through); meta tensors work."""
    return {
        _base_key(n): tuple(t.shape)
        for n, t in model.state_dict(keep_vars=True).items()
        if ".lorad_" not in n and ".lora_" not in n
    }


def base_signature(shapes: Mapping[str, Iterable[int]] | nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the base model's ``*.weight`` names and shapes (matrices and kernels only).

    Takes a model (wrappers and adapter factors are looked through) or a {name: shape} mapping such as a
    checkpoint's, so an adapter file can be matched against a model folder without building the model.
    """
    items = model_shapes(shapes) if isinstance(shapes, nn.Module) else {
        str(n): tuple(int(s) for s in shp) for n, shp in shapes.items()
    }
    # Only ``*.weight`` matrices/kernels: buffers (e.g. positional tables some checkpoints omit) do not count.
    text = "\n".join(f"{n}:{'x'.join(map(str, s))}" for n, s in sorted(items.items()) if len(s) >= 2 and n.endswith(".weight"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ save
def _factors(layer: LoRaDLayer, name: str) -> tuple[nn.Parameter, nn.Parameter]:
    kind = layer.specs[name].kind
    return (layer.lorad_A[name], layer.lorad_B[name]) if kind == "lorad" else (layer.lora_A[name], layer.lora_B[name])


def _plan_record(plan: Any) -> dict[str, Any] | None:
    """What an adapter keeps of the plan it was made from: a config's record, a plan's JSON form, or nothing."""
    if plan is None:
        return None
    if isinstance(plan, LoRaDConfig):
        return plan.plan
    if isinstance(plan, Mapping):
        return dict(plan)
    return plan.to_json()  # a wadi_distill.plan.Plan, or anything else that writes itself as JSON


def adapter_config(model: nn.Module, adapter_name: str = "default", plan: Any = None,
                   base_model_name_or_path: str | None = None) -> LoRaDConfig:
    """The :class:`LoRaDConfig` describing adapter ``adapter_name`` as it sits in ``model``.

    ``plan`` is kept in the config for the record: a :class:`~wadi_distill.plan.Plan` (its JSON form), the config
    it made (``plan.to_config()``, whose record is taken), the JSON form itself, or None.
    """
    layers = {name: layer for name, layer in lorad_layers(model).items() if adapter_name in layer.specs}
    if not layers:
        raise WadiInputError(f"the model has no adapter called {adapter_name!r}, so there is nothing to save.")
    kinds = {layer.specs[adapter_name].kind for layer in layers.values()}
    if len(kinds) != 1:
        raise WadiInputError(f"adapter {adapter_name!r} mixes kinds {sorted(kinds)}; save them as separate adapters.")
    scales = {layer.specs[adapter_name].scale for layer in layers.values()}
    return LoRaDConfig.from_ranks(
        {module: layer.specs[adapter_name].rank for module, layer in layers.items()},
        base_model_name_or_path=base_model_name_or_path,
        kind=kinds.pop(),
        lora_scale=float(scales.pop()) if len(scales) == 1 else 1.0,
        layer_shapes={module: list(layer.weight_shape) for module, layer in layers.items()},
        base_signature=base_signature(model),
        model_class=type(model).__name__,
        adapter_name=adapter_name,
        plan=_plan_record(plan),
        trainable_params=sum(p.numel() for layer in layers.values() for p in _factors(layer, adapter_name)),
    )


def save_adapter(model: nn.Module, path: str | Path, plan: Any = None, *, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to the folder ``path`` (weights + config), atomically.

    ``plan`` (a :class:`~wadi_distill.plan.Plan` or the config it made) is kept in the config for the record.
    Returns the folder.
    """
    config = adapter_config(model, adapter_name, plan, base_model_name_or_path)
    layers = lorad_layers(model)
    if len({layer.specs[adapter_name].scale for layer in layers.values() if adapter_name in layer.specs}) > 1:
        raise WadiInputError(f"adapter {adapter_name!r} has different LoRA scales on different layers; one scale is stored.")
    prefix = "lorad" if config.kind == "lorad" else "lora"
    tensors: dict[str, torch.Tensor] = {}
    for module in config.target_modules:
        a, b = _factors(layers[module], adapter_name)
        tensors[f"{module}.{prefix}_A"] = a.detach().to("cpu").contiguous()
        tensors[f"{module}.{prefix}_B"] = b.detach().to("cpu").contiguous()
    from wadi_probe.io.formats.safetensors_io import write_safetensors

    folder = Path(path)
    with atomic_path(folder, directory=True) as tmp:
        write_safetensors(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": config.to_dict()["format"], "kind": config.kind})
        write_json_atomic(tmp / ADAPTER_CONFIG, config.to_dict())
    return folder


# ------------------------------------------------------------------------------------------------ read
@dataclass
class AdapterFile:
    """An adapter read from disk: kind, per-module (A, B) factors in the project's orientation, its config.

    ``factors[module] = (A, B)`` with A (out, r) and B (r, ⌊fan_in/2⌋) for LoRaD (``lora``: A (r, fan_in),
    B (out, r)). ``config`` is None for official checkpoints (they carry none), and so is their signature.
    """

    path: Path
    kind: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    config: LoRaDConfig | None
    official: bool

    @property
    def signature(self) -> str | None:
        return self.config.base_signature if self.config is not None else None

    def ranks(self) -> dict[str, int]:
        return {m: int(a.shape[1] if self.kind == "lorad" else a.shape[0]) for m, (a, _) in self.factors.items()}

    @property
    def lora_scale(self) -> float:
        return self.config.lora_scale if self.config is not None else 1.0


def _refuse(path: Path, config: LoRaDConfig | None, problems: list[str], total: int, model_class: str | None) -> None:
    made_for = config.model_class if config is not None else None
    what = f" (made for {made_for})" if made_for and made_for != model_class else ""
    shown = ", ".join(problems[:4]) + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
    raise WadiInputError(
        f"adapter {path.name}{what} does not fit this base model: {len(problems)} of "
        f"{total} adapted layers differ: {shown}."
    )


def read_adapter(path: str | Path, *, base_shapes: Mapping[str, tuple[int, ...]] | None = None,
                 model_class: str | None = None) -> AdapterFile:
    """Read an adapter folder (or its ``adapter.safetensors``), or an official theta checkpoint.

    With ``base_shapes`` (``{tensor name: shape}`` of the base model) the adapter is checked against the base
    (every adapted layer present with fitting factors, and the shape signature equal) and official factors are
    oriented to it; a misfit raises :class:`WadiInputError` naming the layers.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise WadiInputError(f"adapter {path} does not exist.")
    if path.is_dir() and not (path / ADAPTER_WEIGHTS).is_file():
        raise WadiInputError(f"{path} has no {ADAPTER_WEIGHTS}; it is not a LoRaD adapter folder.")
    parsed = adapter_files.read_adapter(path)
    config = LoRaDConfig.from_dict(parsed.config, parsed.path.parent / ADAPTER_CONFIG) if parsed.own else None
    families = {entry.family for entry in parsed.modules.values()}
    if len(families) != 1 or (config is None and families != {"lorad"}):
        raise WadiInputError(f"{parsed.path} is not a LoRaD adapter (it holds {', '.join(sorted(families))} factors).")
    kind = families.pop()
    if config is not None and kind != config.kind:
        raise WadiInputError(f"{parsed.path} holds {kind} factors but its config says {config.kind}.")
    if config is not None:
        missing = [m for m in config.target_modules if m not in parsed.modules]
        if missing:
            raise WadiInputError(f"{parsed.path} lacks the factors of {missing[0]} that its config lists.")
    folder = parsed.path.parent if config is not None else parsed.path
    if config is not None:  # the config's (model) order, not the file's alphabetical one
        parsed.modules = {m: parsed.modules[m] for m in config.target_modules}
    if base_shapes is None:
        factors = {m: _pair(e) for m, e in parsed.modules.items()}
        return AdapterFile(folder, kind, factors, config, official=config is None)
    names = list(base_shapes)
    targets, problems = adapter_files.resolve_targets(parsed, names, lambda n: tuple(base_shapes[n]))
    if problems:
        described = [f"{m} (missing)" if p == "missing" else f"{m} (base {tuple(base_shapes[f'{t}.weight'])})"
                     for m, p, t in problems]
        _refuse(folder, config, described, len(parsed.modules), model_class)
    if config is not None and config.strict_base and config.base_signature is not None:
        signature = base_signature(base_shapes)
        if signature != config.base_signature:
            raise WadiInputError(
                f"adapter {folder.name} was made for a different base model (shape signature "
                f"{config.base_signature} vs {signature}), although its layers fit; refusing to mix them."
            )
    factors = {target: _pair(entry) for target, (_, entry) in targets.items()}
    return AdapterFile(folder, kind, factors, config, official=config is None)


def _pair(entry: adapter_files.ModuleAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    f = entry.factors
    return (f["a"], f["b"]) if entry.family == "lorad" else (f["down"], f["up"])


def load_official_thetas(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read an official WaDi angle checkpoint: {module path: (theta_a, theta_b)} as stored (CPU tensors).

    Torch files are loaded with ``weights_only=True`` only; nested ``state_dict``s and ``module.``/``unet.``
    prefixes are unwrapped. The orientation is resolved against a base in :func:`read_adapter`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WadiInputError(f"{path} does not exist." if not path.exists() else f"{path} is not a file.")
    try:
        adapter = read_adapter(path)
    except WadiInputError as exc:
        if "holds no LoRA or LoRaD factors" in str(exc):
            raise WadiInputError(f"{path} holds no '<module>.theta_a' / '.theta_b' tensors; it is not a WaDi angle checkpoint.") from None
        raise
    return dict(adapter.factors)


def load_adapter(model: nn.Module, path: str | Path, *, adapter_name: str = "default",
                 activate: bool = True) -> LoRaDConfig:
    """Inject the adapter stored at ``path`` (own folder or official thetas) into ``model`` as ``adapter_name``.

    Refuses, with a clear message and without touching the model, an adapter made for another base. Returns
    the adapter's config: the one stored with it, or, for an official checkpoint (which carries none), one made
    from the factors' ranks and the base's layer shapes (``Plan.from_config`` turns either into a plan).
    """
    shapes = model_shapes(model)
    adapter = read_adapter(path, base_shapes=shapes, model_class=type(model).__name__)
    ranks = adapter.ranks()
    inject_lorad(model, ranks, adapter_name=adapter_name, kind=adapter.kind, activate=activate, scale=adapter.lora_scale)
    layers = lorad_layers(model)
    with torch.no_grad():
        for module, (a, b) in adapter.factors.items():
            a_store, b_store = _factors(layers[module], adapter_name)
            a_store.copy_(a.to(a_store.dtype))
            b_store.copy_(b.to(b_store.dtype))
    if adapter.config is not None:
        return adapter.config
    return LoRaDConfig.from_ranks(
        ranks, kind=adapter.kind, layer_shapes={m: list(shapes[f"{m}.weight"]) for m in ranks},
        model_class=type(model).__name__, adapter_name=adapter_name,
        trainable_params=sum(a.numel() + b.numel() for a, b in adapter.factors.values()),
    )
