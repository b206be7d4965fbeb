"""A student given as an adapter on top of its teacher: LoRA (diffusers/PEFT, kohya) and LoRaD, merged on the fly.

``open_adapter(path, base)`` returns a :class:`~wadi_probe.io.checkpoints.Checkpoint` with the base's names whose
tensors are the merged weights, computed one module at a time when asked for:

- LoRA: ``W + scale · B·A`` (A = ``lora_A``/``lora.down``/``lora_down``, B = ``lora_B``/``lora.up``/``lora_up``;
  conv factors flattened to matrices); ``scale = alpha / r`` from a ``.alpha`` tensor (kohya, converted files),
  ``adapter_config.json`` or the ``lora_adapter_metadata`` of a diffusers file (PEFT's ``lora_alpha``,
  ``rank_pattern``/``alpha_pattern``, ``use_rslora``), else 1.
- LoRaD: ``R_Θ(W)`` with ``Θ = A·B`` (``theta_a``/``lorad_A`` (out, r), ``theta_b``/``lorad_B`` (r, fan_in//2)),
  applied with :func:`wadi_probe.rotation.rotate_pairs` on the weight viewed as (out, fan_in).

Adapted tensors are merged in float32 (or wider) and returned in ``promote(base dtype, float32)``, so a small
update on an fp16 base is not rounded away; untouched tensors are the base's own.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wadi_probe.io.checkpoints import Checkpoint
from wadi_probe.errors import WadiInputError
from wadi_probe.io.jsonfile import read_json
from wadi_probe.rotation import as_matrix, rotate_pairs

_ADAPTER_KEY = re.compile(r"(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|theta_a|theta_b|lorad_A|lorad_B)(\.|$)")
_ADAPTER_FILES = (
    "adapter_model.safetensors",
    "pytorch_lora_weights.safetensors",
    "adapter.safetensors",
    "lorad.safetensors",
    "adapter_model.bin",
    "pytorch_lora_weights.bin",
)
# key suffix patterns -> (family, factor); the module path is group "m"
_FACTOR_PATTERNS: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(r"^(?P<m>.+)\.lora_A(?:\.[^.]+)?(?:\.weight)?$"), "lora", "down"),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.[^.]+)?(?:\.weight)?$"), "lora", "up"),
    (re.compile(r"^(?P<m>.+)\.lora\.down\.weight$"), "lora", "down"),
    (re.compile(r"^(?P<m>.+)\.lora\.up\.weight$"), "lora", "up"),
    (re.compile(r"^(?P<m>.+)\.lora_down\.weight$"), "lora", "down"),
    (re.compile(r"^(?P<m>.+)\.lora_up\.weight$"), "lora", "up"),
    (re.compile(r"^(?P<m>.+)\.(?:theta_a|lorad_A)(?:\.[^.]+)?$"), "lorad", "a"),
    (re.compile(r"^(?P<m>.+)\.(?:theta_b|lorad_B)(?:\.[^.]+)?$"), "lorad", "b"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha", "alpha"),
]
_OTHER_MODEL = re.compile(r"^(lora_te\d?_|text_encoder(_\d)?\.|te\d?\.|vae\.|first_stage_model\.|cond_stage_model\.|conditioner\.)")
_STRIP_PREFIXES = ("base_model.model.", "module.", "unet.", "transformer.", "model.diffusion_model.", "model.")
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.")


def looks_like_adapter(names: list[str]) -> bool:
    """True when most keys are LoRA/LoRaD factors rather than model weights."""
    hits = sum(1 for name in names if _ADAPTER_KEY.search(name))
    return bool(names) and hits >= len(names) / 2


@dataclass
class ModuleAdapter:
    """The factors one module of the base receives."""

    family: str  # "lora" or "lorad"
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)


@dataclass
class ParsedAdapter:
    """An adapter file read into per-module factors (module paths as stored, prefixes removed)."""

    path: Path
    modules: dict[str, ModuleAdapter]
    ignored_keys: list[str]
    config: dict[str, Any]


def find_adapter_file(path: Path) -> Path:
    """The adapter weights inside a folder (PEFT / diffusers / wadi names), or the file itself."""
    if path.is_file():
        return path
    for name in _ADAPTER_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    if len(found) == 1:
        return found[0]
    raise WadiInputError(f"{path} holds no adapter weights (expected adapter_model.safetensors or one .safetensors file).")


def _read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a (small) adapter file completely."""
    if path.suffix == ".safetensors":
        from wadi_probe.io.formats.safetensors_io import SafetensorsSource

        source = SafetensorsSource(path)
        tensors = {key: source.tensor(key) for key in source.keys()}
        metadata = source.metadata
        source.close()
        return tensors, metadata
    from wadi_probe.io.formats.torch_io import TorchSource

    torch_source = TorchSource(path)
    return {key: torch_source.tensor(key) for key in torch_source.keys()}, {}


def _adapter_config(file: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """PEFT-style settings from ``adapter_config.json`` beside the file or from diffusers' safetensors metadata."""
    config_path = file.parent / "adapter_config.json"
    config: dict[str, Any] = {}
    if config_path.is_file():
        config = read_json(config_path)
    elif metadata.get("lora_adapter_metadata"):
        try:
            raw = json.loads(metadata["lora_adapter_metadata"])
        except ValueError as exc:
            raise WadiInputError(f"{file} has unreadable lora_adapter_metadata.") from exc
        if "r" in raw:
            config = raw
        else:  # pipeline files prefix each entry with the model name
            for prefix in ("unet.", "transformer."):
                config = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)} or config
    if config.get("use_dora"):
        raise WadiInputError(f"{file} is a DoRA adapter, which this tool cannot merge (LoRA and LoRaD only).")
    return config


def read_adapter(path: str | Path) -> ParsedAdapter:
    """Parse an adapter file into per-module factors; text-encoder parts are set aside."""
    file = find_adapter_file(Path(path))
    tensors, metadata = _read_all(file)
    config = _adapter_config(file, metadata)
    modules: dict[str, ModuleAdapter] = {}
    ignored: list[str] = []
    for key, value in tensors.items():
        name = _PROCESSOR.sub(lambda m: "." + ("to_out.0" if m.group(1) == "to_out" else m.group(1)) + ".lora.", key)
        if "dora_scale" in name or "lora_magnitude_vector" in name:
            raise WadiInputError(f"{file} is a DoRA adapter, which this tool cannot merge (LoRA and LoRaD only).")
        # biases (PEFT's lora_B.bias) and full deltas (kohya .diff/.diff_b) change no weight matrix: set aside
        if _OTHER_MODEL.match(name) or name.endswith((".lora_B.bias", ".diff", ".diff_b")):
            ignored.append(key)
            continue
        for pattern, family, factor in _FACTOR_PATTERNS:
            match = pattern.match(name)
            if match:
                break
        else:
            ignored.append(key)
            continue
        module = match.group("m")
        for prefix in _STRIP_PREFIXES:
            if module.startswith(prefix):
                module = module[len(prefix):]
                break
        entry = modules.setdefault(module, ModuleAdapter(family if family != "alpha" else "lora"))
        entry.keys.append(key)
        if family == "alpha":
            entry.alpha = float(value.float().reshape(-1)[0])
            continue
        if entry.family != family and entry.factors:
            raise WadiInputError(f"{file} mixes LoRA and LoRaD factors for module {module}.")
        entry.family = family
        entry.factors[factor] = value
    for module, entry in modules.items():
        needed = {"down", "up"} if entry.family == "lora" else {"a", "b"}
        if set(entry.factors) != needed:
            raise WadiInputError(f"{file} has an incomplete adapter for {module} (found {sorted(entry.factors)}, need {sorted(needed)}).")
    if not modules:
        raise WadiInputError(f"{file} holds no LoRA or LoRaD factors for the denoiser.")
    return ParsedAdapter(file, modules, ignored, config)


def _pattern_value(patterns: dict[str, Any], module: str) -> Any:
    """PEFT rank/alpha patterns: a key matches a module when the module name ends with it (regex allowed)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def lora_scale(entry: ModuleAdapter, module: str, config: dict[str, Any]) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), or a per-module ``scales`` entry; 1 when none is known."""
    scales = config.get("scales") or {}
    if module in scales:
        return float(scales[module])
    rank = entry.factors["down"].shape[0]
    alpha = entry.alpha
    if alpha is None and config:
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module)
        if alpha is None:
            alpha = config.get("lora_alpha")
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def merge_module(weight: torch.Tensor, entry: ModuleAdapter, scale: float) -> torch.Tensor:
    """The merged weight of one module (float32 or wider)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    matrix = as_matrix(weight.to(dtype))
    if entry.family == "lora":
        down = entry.factors["down"].to(dtype).reshape(entry.factors["down"].shape[0], -1)
        up = entry.factors["up"].to(dtype).reshape(entry.factors["up"].shape[0], -1)
        if up.shape[0] != matrix.shape[0] or down.shape[1] != matrix.shape[1] or up.shape[1] != down.shape[0]:
            raise ValueError(f"LoRA factors {tuple(up.shape)}·{tuple(down.shape)} do not fit a weight {tuple(matrix.shape)}")
        merged = matrix + scale * (up @ down)
    else:
        theta = entry.factors["a"].to(dtype) @ entry.factors["b"].to(dtype)
        merged = rotate_pairs(matrix, theta)
    return merged.reshape(weight.shape)


def _resolver(base_names: list[str]) -> dict[str, str]:
    """Flattened module spellings (kohya ``a_b_c``, LDM names) -> the base's module names."""
    from wadi_probe.io.ldm import diffusers_to_ldm_names

    modules = {name[: -len(".weight")] for name in base_names if name.endswith(".weight")}
    table: dict[str, str] = {}
    try:
        ldm = diffusers_to_ldm_names(base_names)
    except WadiInputError:
        ldm = {}
    for name in base_names:
        if name.endswith(".weight") and name in ldm:
            table[ldm[name][: -len(".weight")]] = name[: -len(".weight")]
            table[ldm[name][: -len(".weight")].replace(".", "_")] = name[: -len(".weight")]
    for module in modules:
        table[module] = module
        table[module.replace(".", "_")] = module
    return table


def open_adapter(path: Path, base: Checkpoint) -> AdapterCheckpoint:
    """Open ``path`` as an adapter merged onto ``base``; see the module docstring."""
    parsed = read_adapter(path)
    base_names = base.names()
    table: dict[str, str] | None = None
    targets: dict[str, tuple[ModuleAdapter, float]] = {}
    for module, entry in parsed.modules.items():
        target = module if module + ".weight" in base else None
        if target is None:
            if table is None:
                table = _resolver(base_names)
            flat = module[len("lora_unet_"):] if module.startswith("lora_unet_") else module
            target = table.get(flat)
        if target is None or target + ".weight" not in base:
            raise WadiInputError(
                f"the adapter {parsed.path} changes module {module}, which {base.path} does not have "
                "(is the adapter meant for another model?)."
            )
        weight_shape = base.shape(target + ".weight")
        fan_in = math.prod(weight_shape[1:]) if len(weight_shape) > 1 else 0
        if entry.family == "lora":
            down, up = entry.factors["down"], entry.factors["up"]
            fits = len(weight_shape) > 1 and up.shape[0] == weight_shape[0] and math.prod(down.shape[1:]) == fan_in
        else:
            a, b = entry.factors["a"], entry.factors["b"]
            pairs = fan_in // 2
            oriented = a.shape[0] == weight_shape[0] and tuple(b.shape) == (a.shape[1], pairs)
            swapped = a.ndim == b.ndim == 2 and b.shape[0] == weight_shape[0] and tuple(a.shape) == (b.shape[1], pairs)
            if len(weight_shape) > 1 and swapped and not oriented:
                entry.factors["a"], entry.factors["b"] = b, a  # stored as (B, A): put A (out, r) first
                a, b = b, a
            fits = len(weight_shape) > 1 and a.shape[0] == weight_shape[0] and b.shape == (a.shape[1], fan_in // 2)
        if not fits:
            raise WadiInputError(
                f"the adapter's factors for {module} do not fit {base.path}'s weight of shape {weight_shape} "
                "(is the adapter meant for another model?)."
            )
        scale = lora_scale(entry, module, parsed.config) if entry.family == "lora" else 1.0
        targets[target + ".weight"] = (entry, scale)
    return AdapterCheckpoint(Path(path), base, targets, parsed)


class AdapterCheckpoint(Checkpoint):
    """``base`` with an adapter merged into the named weights, computed one tensor at a time."""

    def __init__(self, path: Path, base: Checkpoint, targets: dict[str, tuple[ModuleAdapter, float]],
                 parsed: ParsedAdapter) -> None:
        super().__init__(
            path, "adapter", {name: base._entry(name) for name in base.names()}, sources=[],
            ignored_keys=parsed.ignored_keys,
            info={"base": str(base.path), "base_layout": base.layout, "adapter_file": str(parsed.path),
                  "adapted": len(targets), "families": sorted({entry.family for entry, _ in targets.values()})},
        )
        self.base = base
        self.targets = targets
        # writing the merged view in the base's layout keeps the base's other keys and nesting
        self._ignored_sources = dict(base._ignored_sources)
        if "nesting" in base.info:
            self.info["nesting"] = base.info["nesting"]

    def adapted_names(self) -> list[str]:
        """Names whose tensors the adapter changes."""
        return [name for name in self.names() if name in self.targets]

    def dtype(self, name: str) -> torch.dtype:
        base_dtype = self.base.dtype(name)
        return torch.promote_types(base_dtype, torch.float32) if name in self.targets else base_dtype

    def stored_dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def tensor(self, name: str) -> torch.Tensor:
        weight = self.base.tensor(name)
        if name not in self.targets:
            return weight
        entry, scale = self.targets[name]
        return merge_module(weight, entry, scale)

    def close(self) -> None:
        """Drops the adapter factors; the base stays open (its owner closes it)."""
        self.targets = {}
