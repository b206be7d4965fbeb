"""Adapter files: save and load LoRaD adapters, and import the official WaDi angle checkpoints.

The project's own format is a folder with

* ``adapter.safetensors`` — the factors, keyed ``<module>.lorad_A`` (out, r) and ``<module>.lorad_B``
  (r, ⌊fan_in/2⌋) (``<module>.lora_A`` / ``.lora_B`` for a LoRA adapter), in fp32;
* ``adapter_config.json`` — the adapter kind, the plan (modules, ranks, shapes) and a signature of the base
  model's weight shapes, so that loading onto a different base is refused with a clear message.

Official WaDi checkpoints store A and B as ``<module path>.theta_a`` / ``.theta_b``; they are read from a torch
file with ``weights_only=True`` (never unpickling code) or from safetensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from wadi_distill.lorad.layer import LoRaDLayer, inject_lorad, lorad_layers
from wadi_distill.plan.planner import Plan, PlanEntry, lorad_params_for
from wadi_probe.io.atomic import atomic_path
from wadi_probe.errors import WadiInputError
from wadi_probe.io.jsonfile import read_json

__all__ = [
    "ADAPTER_WEIGHTS",
    "ADAPTER_CONFIG",
    "AdapterFile",
    "base_signature",
    "save_adapter",
    "read_adapter",
    "load_adapter",
    "load_official_thetas",
    "is_official_thetas",
    "export_merged",
]

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "wadi-lorad-adapter"
ADAPTER_VERSION = 1
_OFFICIAL_KEY = re.compile(r"^(?P<module>.+)\.theta_(?P<which>[ab])$")
_PREFIXES = ("module.", "_orig_mod.", "base_model.model.", "unet.", "transformer.", "model.diffusion_model.")


# ------------------------------------------------------------------------------------------------ signature
def _base_key(name: str) -> str:
    return name.replace(".base_layer.", ".")


def base_signature(shapes: Mapping[str, Iterable[int]] | nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the base model's ``*.weight`` names and shapes (matrices and kernels only).

    Takes a model (wrappers and adapter factors are looked through) or a {name: shape} mapping such as a
    checkpoint's, so an adapter file can be matched against a model folder without building the model.
    """
    if isinstance(shapes, nn.Module):
        items = {
            _base_key(n): tuple(t.shape)
            for n, t in shapes.state_dict(keep_vars=True).items()
            if ".lorad_" not in n and ".lora_" not in n
        }
    else:
        items = {str(n): tuple(int(s) for s in shp) for n, shp in shapes.items()}
    # Only ``*.weight`` matrices/kernels: buffers (e.g. positional tables some checkpoints omit) do not count.
    text = "\n".join(f"{n}:{'x'.join(map(str, s))}" for n, s in sorted(items.items()) if len(s) >= 2 and n.endswith(".weight"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _checkpoint_shapes(checkpoint: Any) -> dict[str, tuple[int, ...]]:
    return {name: tuple(checkpoint.shape(name)) for name in checkpoint.names()}


# ------------------------------------------------------------------------------------------------ save
def save_adapter(model: nn.Module, path: str | Path, plan: Plan | None = None, *, adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` of ``model`` to the folder ``path`` (weights + config), atomically.

    ``plan`` is stored in the config (the plan of the layers that carry the adapter is rebuilt when omitted).
    Returns the folder.
    """
    layers = {name: layer for name, layer in lorad_layers(model).items() if adapter_name in layer.specs}
    if not layers:
        raise WadiInputError(f"the model has no adapter called {adapter_name!r}, so there is nothing to save.")
    kinds = {layer.specs[adapter_name].kind for layer in layers.values()}
    if len(kinds) != 1:
        raise WadiInputError(f"adapter {adapter_name!r} mixes kinds {sorted(kinds)}; save them as separate adapters.")
    kind = kinds.pop()
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for module, layer in layers.items():
        spec = layer.specs[adapter_name]
        a_store, b_store = (layer.lorad_A, layer.lorad_B) if kind == "lorad" else (layer.lora_A, layer.lora_B)
        prefix = "lorad" if kind == "lorad" else "lora"
        tensors[f"{module}.{prefix}_A"] = a_store[adapter_name].detach().to("cpu").contiguous()
        tensors[f"{module}.{prefix}_B"] = b_store[adapter_name].detach().to("cpu").contiguous()
        params = lorad_params_for(layer.weight_shape, spec.rank) if kind == "lorad" else spec.rank * (layer.out_features + layer.fan_in)
        entries.append(PlanEntry(module, spec.rank, params, layer.weight_shape))
    if plan is None:
        plan = Plan(entries, source=f"adapter:{adapter_name}", model_class=type(model).__name__)
    config = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "adapter_name": adapter_name,
        "kind": kind,
        "scales": {m: layer.specs[adapter_name].scale for m, layer in layers.items()} if kind == "lora" else None,
        "model_class": type(model).__name__,
        "base_signature": base_signature(model),
        "layers": {e.module: {"rank": e.rank, "shape": list(e.shape)} for e in entries},
        "trainable_params": sum(t.numel() for t in tensors.values()),
        "plan": plan.to_json(),
    }
    from safetensors.torch import save_file

    folder = Path(path)
    with atomic_path(folder, directory=True) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": ADAPTER_FORMAT, "kind": kind})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return folder


# ------------------------------------------------------------------------------------------------ read
class AdapterFile:
    """An adapter read from disk, in either format: kind, per-module (A, B) factors and shapes, its signature.

    ``factors[module] = (A, B)`` with A (out, r) and B (r, ⌊fan_in/2⌋) for LoRaD (``lora``: A (r, fan_in),
    B (out, r)). ``signature`` is None for official checkpoints (they carry none).
    """

    def __init__(self, path: Path, kind: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 signature: str | None, config: dict[str, Any], official: bool) -> None:
        self.path, self.kind, self.factors, self.signature = path, kind, factors, signature
        self.config, self.official = config, official

    def ranks(self) -> dict[str, int]:
        return {m: int(a.shape[1] if self.kind == "lorad" else a.shape[0]) for m, (a, _) in self.factors.items()}

    def check_base(self, shapes: Mapping[str, tuple[int, ...]], model_class: str | None = None) -> None:
        """Refuse (WadiInputError) when the adapted layers are missing from or shaped differently in the base."""
        problems = []
        for module, (a, b) in self.factors.items():
            shape = shapes.get(f"{module}.weight")
            if shape is None:
                problems.append(f"{module} (missing)")
                continue
            out, fan_in = int(shape[0]), math.prod(shape[1:])
            if self.kind == "lorad":
                fits = a.shape[0] == out and b.shape[1] == fan_in // 2 and a.shape[1] == b.shape[0]
            else:
                fits = a.shape[1] == fan_in and b.shape[0] == out and a.shape[0] == b.shape[1]
            if not fits:
                problems.append(f"{module} (base {tuple(shape)})")
        if problems:
            made_for = self.config.get("model_class")
            what = f" (made for {made_for})" if made_for and made_for != model_class else ""
            shown = ", ".join(problems[:4]) + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise WadiInputError(
                f"adapter {self.path.name}{what} does not fit this base model: {len(problems)} of "
                f"{len(self.factors)} adapted layers differ: {shown}."
            )
        if self.signature is not None and self.signature != base_signature(shapes) and self.config.get("strict_base", True):
            raise WadiInputError(
                f"adapter {self.path.name} was made for a different base model (shape signature "
                f"{self.signature} vs {base_signature(shapes)}), although its layers fit; refusing to mix them."
            )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WadiInputError(f"{path} is not a readable safetensors file ({exc}).") from None


def _strip_prefix(keys: list[str]) -> dict[str, str]:
    """Map stored keys to keys without a wrapper prefix shared by all of them."""
    mapping = {k: k for k in keys}
    for prefix in _PREFIXES:
        if mapping and all(v.startswith(prefix) for v in mapping.values()):
            mapping = {k: v[len(prefix):] for k, v in mapping.items()}
    return mapping


def is_official_thetas(keys: Iterable[str]) -> bool:
    """True when the keys look like an official WaDi checkpoint (``<module>.theta_a`` / ``.theta_b``)."""
    keys = list(keys)
    return bool(keys) and sum(1 for k in keys if _OFFICIAL_KEY.match(k)) >= len(keys) / 2


def load_official_thetas(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read an official WaDi angle checkpoint: {module path: (theta_a, theta_b)} as stored (CPU tensors).

    Torch files are loaded with ``weights_only=True`` only; nested ``state_dict``s and ``module.``/``unet.``
    prefixes are unwrapped. The orientation of the factors is resolved against the base in :func:`read_adapter`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WadiInputError(f"{path} does not exist." if not path.exists() else f"{path} is not a file.")
    if path.suffix == ".safetensors":
        tensors = _load_safetensors(path)
    else:
        from wadi_probe.io.formats.torch_io import find_state_dict, load_weights_only

        tensors, _ = find_state_dict(load_weights_only(path), path)
    renamed = _strip_prefix(list(tensors))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, name in renamed.items():
        match = _OFFICIAL_KEY.match(name)
        if match:
            pairs.setdefault(match["module"], {})[match["which"]] = tensors[key]
    if not pairs:
        raise WadiInputError(f"{path} holds no '<module>.theta_a' / '.theta_b' tensors; it is not a WaDi angle checkpoint.")
    incomplete = [m for m, p in pairs.items() if set(p) != {"a", "b"}]
    if incomplete:
        raise WadiInputError(f"{path} has theta_a without theta_b (or the reverse) for {', '.join(incomplete[:3])}.")
    for module, p in pairs.items():
        if p["a"].ndim != 2 or p["b"].ndim != 2:
            raise WadiInputError(f"{path}: theta factors of {module} must be matrices, got {tuple(p['a'].shape)} and {tuple(p['b'].shape)}.")
    return {m: (p["a"], p["b"]) for m, p in pairs.items()}


def _orient_official(thetas: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                     shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Put each (theta_a, theta_b) as (A (out, r), B (r, pairs)); factors stored the other way round are swapped."""
    oriented = {}
    for module, (a, b) in thetas.items():
        shape = shapes.get(f"{module}.weight")
        if shape is not None:
            out, pairs = int(shape[0]), math.prod(shape[1:]) // 2
            if not (a.shape[0] == out and b.shape[1] == pairs) and (b.shape[0] == out and a.shape[1] == pairs):
                a, b = b, a
        oriented[module] = (a, b)
    return oriented


def read_adapter(path: str | Path, *, base_shapes: Mapping[str, tuple[int, ...]] | None = None) -> AdapterFile:
    """Read an adapter folder (or its ``adapter.safetensors``), or an official theta checkpoint.

    With ``base_shapes`` (``{tensor name: shape}`` of the base model) the adapter is checked against the base
    and official factors are oriented to it.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise WadiInputError(f"adapter {path} does not exist.")
    folder = path if path.is_dir() else path.parent
    weights = path / ADAPTER_WEIGHTS if path.is_dir() else path
    config_path = folder / ADAPTER_CONFIG
    if path.is_dir() and not weights.is_file():
        raise WadiInputError(f"{path} has no {ADAPTER_WEIGHTS}; it is not a LoRaD adapter folder.")
    own = config_path.is_file() and (path.is_dir() or path.name == ADAPTER_WEIGHTS)
    if own:
        config = read_json(config_path)
        if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
            raise WadiInputError(f"{config_path} is not a wadi LoRaD adapter config.")
        if config.get("version") != ADAPTER_VERSION:
            raise WadiInputError(f"adapter format version {config.get('version')!r} is not supported (this version reads {ADAPTER_VERSION}).")
        kind = str(config.get("kind", "lorad"))
        prefix = "lorad" if kind == "lorad" else "lora"
        tensors = _load_safetensors(weights)
        factors = {}
        for module in config.get("layers", {}):
            try:
                factors[module] = (tensors[f"{module}.{prefix}_A"], tensors[f"{module}.{prefix}_B"])
            except KeyError:
                raise WadiInputError(f"{weights} lacks the factors of {module} that its config lists.") from None
        result = AdapterFile(folder, kind, factors, config.get("base_signature"), config, official=False)
    else:
        thetas = load_official_thetas(weights)
        if base_shapes is not None:
            thetas = _orient_official(thetas, base_shapes)
        result = AdapterFile(weights, "lorad", dict(thetas), None, {}, official=True)
    if base_shapes is not None:
        result.check_base(base_shapes)
    return result


def _model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        _base_key(n): tuple(t.shape)
        for n, t in model.state_dict(keep_vars=True).items()
        if ".lorad_" not in n and ".lora_" not in n
    }


def load_adapter(model: nn.Module, path: str | Path, *, adapter_name: str = "default", activate: bool = True) -> Plan:
    """Inject the adapter stored at ``path`` (own folder or official thetas) into ``model`` as ``adapter_name``.

    Refuses, with a clear message and without touching the model, an adapter made for another base. Returns
    the plan the adapter was made with (or one rebuilt from the factors' shapes).
    """
    shapes = _model_shapes(model)
    adapter = read_adapter(path, base_shapes=shapes)
    ranks = adapter.ranks()
    scales = (adapter.config.get("scales") or {}) if adapter.kind == "lora" else {}
    inject_lorad(model, ranks, adapter_name=adapter_name, kind=adapter.kind, activate=activate,
                 scale=next(iter(scales.values()), 1.0) if scales else 1.0)
    layers = lorad_layers(model)
    with torch.no_grad():
        for module, (a, b) in adapter.factors.items():
            layer: LoRaDLayer = layers[module]
            a_store, b_store = (layer.lorad_A, layer.lorad_B) if adapter.kind == "lorad" else (layer.lora_A, layer.lora_B)
            a_store[adapter_name].copy_(a.to(a_store[adapter_name].dtype))
            b_store[adapter_name].copy_(b.to(b_store[adapter_name].dtype))
            if module in scales:
                layer.specs[adapter_name] = type(layer.specs[adapter_name])(kind="lora", rank=ranks[module], scale=float(scales[module]))
    if not adapter.official and adapter.config.get("plan"):
        return Plan.from_json(adapter.config["plan"])
    entries = [PlanEntry(m, r, lorad_params_for(shapes[f"{m}.weight"], r), shapes[f"{m}.weight"]) for m, r in ranks.items()]
    return Plan(entries, source=f"official:{Path(path).name}", model_class=type(model).__name__)


def export_merged(teacher_dir: str | Path, adapter_path: str | Path, output: str | Path) -> Path:
    """Write the teacher with the adapter merged in (see :func:`wadi_distill.export.export_merged`)."""
    from wadi_distill.export import export_merged as _export_merged

    return _export_merged(teacher_dir, adapter_path, output)
