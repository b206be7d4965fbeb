"""A student given as an adapter on top of its teacher: LoRA (diffusers/PEFT, kohya) and LoRaD, merged on the fly.

Adapter files, parsed into per-module factors; :func:`wadi_probe.io.checkpoints.open_checkpoint` with ``base=``
presents a base with such an adapter merged in, one module at a time when asked for:

- LoRA: ``W + scale · B·A`` (A = ``lora_A``/``lora.down``/``lora_down``, B = ``lora_B``/``lora.up``/``lora_up``;
  conv factors flattened to matrices); ``scale = alpha / r`` from a ``.alpha`` tensor (kohya, converted files),
  ``adapter_config.json`` or the ``lora_adapter_metadata`` of a diffusers file (PEFT's ``lora_alpha``,
  ``rank_pattern``/``alpha_pattern``, ``use_rslora``), else 1.
- LoRaD: ``R_Θ(W)`` with ``Θ = A·B`` (``theta_a``/``lorad_A`` (out, r), ``theta_b``/``lorad_B`` (r, fan_in//2)),
  on the weight viewed as (out, fan_in); factors stored the other way round are put right once, in
  :func:`orient_lorad_factors`.

Both merges are :func:`wadi_probe.rotation.merged_weight`. :func:`read_adapter` is the project's one adapter
parser (``wadi_distill.lorad`` reads its own folders through it too) and :func:`resolve_targets` the one place
stored module names are matched to a base's and checked against its shapes.

Adapted tensors are merged in float32 (or wider) and returned in ``promote(base dtype, float32)``, so a small
update on an fp16 base is not rounded away; untouched tensors are the base's own.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from wadi_probe.errors import WadiInputError
from wadi_probe.io.jsonfile import read_json
from wadi_probe.io.names import ADAPTER_PREFIXES, strip_prefixes
from wadi_probe.rotation import merged_weight

OWN_FORMAT = "wadi-lorad-adapter"  # the "format" of wadi_distill's adapter_config.json

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

    @property
    def own(self) -> bool:
        """True for an adapter folder wadi_distill wrote (its adapter_config.json says so)."""
        return self.config.get("format") == OWN_FORMAT


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
        from wadi_probe.io.formats.safetensors_io import SafetensorsSource, utf8_path

        utf8_path(path)
        try:
            source = SafetensorsSource(path)
        except WadiInputError as exc:
            raise WadiInputError(f"{path} is not a readable safetensors file ({str(exc).removeprefix(str(path) + ' ')}).") from None
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
        if not isinstance(config, dict):
            raise WadiInputError(f"{config_path} is not an adapter config (not a JSON object).")
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


def _peft_names(keys: list[str]) -> dict[str, str]:
    """Old diffusers attention-processor LoRA keys (``attn1.processor.to_q_lora.down.weight``) in PEFT naming.

    diffusers' own ``convert_unet_state_dict_to_peft`` does the renaming, fed the keys as placeholder values; it
    is only imported when a file has such keys, so reading every other adapter does not load diffusers.
    """
    if not any(".processor." in key for key in keys):
        return {key: key for key in keys}
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    return {old: new for new, old in convert_unet_state_dict_to_peft({key: key for key in keys}).items()}


def read_adapter(path: str | Path) -> ParsedAdapter:
    """Parse an adapter file into per-module factors; text-encoder parts are set aside."""
    file = find_adapter_file(Path(path))
    tensors, metadata = _read_all(file)
    config = _adapter_config(file, metadata)
    modules: dict[str, ModuleAdapter] = {}
    ignored: list[str] = []
    renamed = _peft_names(list(tensors))
    for key, value in tensors.items():
        name = renamed[key]
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
        module = strip_prefixes(match.group("m"), ADAPTER_PREFIXES)
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
        if entry.family == "lorad" and entry.factors and set(entry.factors) != needed:
            raise WadiInputError(f"{file} has theta_a without theta_b (or the reverse) for {module}.")
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
    if config.get("format") == OWN_FORMAT:  # wadi_distill's LoRA kind: one scale, independent of the rank
        return float(config.get("lora_scale", 1.0))
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
    """The merged weight of one module, in float32 or wider (:func:`wadi_probe.rotation.merged_weight`)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    if entry.family == "lora":
        return merged_weight(weight, entry.factors["down"], entry.factors["up"], kind="lora", scale=scale, dtype=dtype)
    return merged_weight(weight, entry.factors["a"], entry.factors["b"], kind="lorad", dtype=dtype)


def orient_lorad_factors(a: torch.Tensor, b: torch.Tensor, weight_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRaD factors as (A (out, r), B (r, fan_in // 2)) for a weight of ``weight_shape``.

    Official WaDi files store ``theta_a``/``theta_b`` in either order; a pair that fits only the other way round
    is swapped, anything else is returned as it came (the caller's shape check then refuses it).
    """
    if len(weight_shape) < 2 or a.ndim != 2 or b.ndim != 2:
        return a, b
    out, pairs = int(weight_shape[0]), math.prod(weight_shape[1:]) // 2
    oriented = a.shape[0] == out and tuple(b.shape) == (a.shape[1], pairs)
    swapped = b.shape[0] == out and tuple(a.shape) == (b.shape[1], pairs)
    return (b, a) if swapped and not oriented else (a, b)


def factors_fit(entry: ModuleAdapter, weight_shape: tuple[int, ...]) -> bool:
    """Whether ``entry``'s (oriented) factors fit a base weight of ``weight_shape``."""
    if len(weight_shape) < 2:
        return False
    fan_in = math.prod(weight_shape[1:])
    if entry.family == "lora":
        down, up = entry.factors["down"], entry.factors["up"]
        return up.shape[0] == weight_shape[0] and math.prod(down.shape[1:]) == fan_in and up.shape[1] == down.shape[0]
    a, b = entry.factors["a"], entry.factors["b"]
    return a.ndim == b.ndim == 2 and a.shape[0] == weight_shape[0] and tuple(b.shape) == (a.shape[1], fan_in // 2)


def _resolver(base_names: list[str]) -> dict[str, str]:
    """Flattened module spellings (kohya ``a_b_c``, LDM names) -> the base's module names.

    Written here rather than taken from diffusers' kohya conversion (``_maybe_map_sgm_blocks_to_diffusers`` +
    ``_convert_non_diffusers_lora_to_diffusers``), because that does not give the same modules: measured on tiny
    SD1-, SD2-, SDXL- and SD1.5-shaped UNets with every weight matrix adapted, it loses the up-block upsampler of
    LDM-spelled files (SD1/SD2), SDXL's ``add_embedding`` in diffusers spelling, and raises KeyError on LDM-spelled
    files with ten or more input blocks (SD1.5's layout). This table is built from the base's own names (through
    :func:`wadi_probe.io.ldm.diffusers_to_ldm_names`, which the tests hold to diffusers' LDM converter), so every
    module the base has can be named.
    """
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


_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")

#: {original fused module: [(diffusers module, [(first row, end row), …]), …]}: how a Flux/SD3 original file's
#: stored modules split into the base's modules (:meth:`wadi_probe.io.checkpoints.OriginalCheckpoint.original_modules`)
OriginalModules = dict[str, list[tuple[str, list[tuple[int, int]]]]]


def _split_lora(entry: ModuleAdapter, parts: list[tuple[str, list[tuple[int, int]]]]
                ) -> list[tuple[str, ModuleAdapter]] | None:
    """A LoRA on a fused original module (Flux ``img_attn.qkv``, ``linear1``) as one LoRA per diffusers module.

    ``W_fused + s·B·A`` changes row i of the fused weight by ``s·B[i]·A``, so each part gets the rows of B that
    make it (the same A, alpha and scale). LoRaD factors on fused modules are not split (None).
    """
    if entry.family != "lora":
        return None
    up = entry.factors["up"]
    split = []
    for module, ranges in parts:
        if any(stop > up.shape[0] for _, stop in ranges):
            return None
        rows = torch.cat([up[start:stop] for start, stop in ranges])
        split.append((module, ModuleAdapter("lora", {"down": entry.factors["down"], "up": rows}, entry.alpha,
                                            list(entry.keys))))
    return split


def resolve_targets(parsed: ParsedAdapter, base_names: list[str], shape_of: Callable[[str], tuple[int, ...]],
                    original_modules: OriginalModules | None = None,
                    ) -> tuple[dict[str, tuple[str, ModuleAdapter]], list[tuple[str, str, str | None]]]:
    """Match the adapter's modules to the base's and check their shapes.

    Returns ({base module path: (stored module name, entry with oriented factors)}, problems), each problem
    (stored module name, ``"missing"`` or ``"shape"``, the base module path or None). Module names are taken as
    stored, else through the kohya (``lora_unet_a_b_c``, ``lora_transformer_a_b_c``) and LDM spellings of the
    base's names, else, for a base read from a Flux/SD3 original file (``original_modules``), as the file's own
    module names (``double_blocks.0.img_attn.qkv``, kohya-flattened or not): a LoRA on a fused module is split
    into one LoRA per diffusers module it holds.
    """
    names = set(base_names)
    table: dict[str, str] | None = None
    originals = dict(original_modules or {})
    originals.update({module.replace(".", "_"): parts for module, parts in list(originals.items())})
    targets: dict[str, tuple[str, ModuleAdapter]] = {}
    problems: list[tuple[str, str, str | None]] = []
    for module, entry in parsed.modules.items():
        target: str | None = module if module + ".weight" in names else None
        flat = module
        if target is None:
            if table is None:
                table = _resolver(base_names)
            flat = next((module[len(p):] for p in _KOHYA_PREFIXES if module.startswith(p)), module)
            target = table.get(flat)
        if target is None and flat in originals:
            split = _split_lora(entry, originals[flat])
            if split is None:
                problems.append((module, "shape", originals[flat][0][0]))
                continue
            for part_target, part in split:
                if factors_fit(part, tuple(shape_of(part_target + ".weight"))):
                    targets[part_target] = (module, part)
                else:
                    problems.append((module, "shape", part_target))
            continue
        if target is None or target + ".weight" not in names:
            problems.append((module, "missing", None))
            continue
        weight_shape = tuple(shape_of(target + ".weight"))
        if entry.family == "lorad":
            entry.factors["a"], entry.factors["b"] = orient_lorad_factors(entry.factors["a"], entry.factors["b"], weight_shape)
        if not factors_fit(entry, weight_shape):
            problems.append((module, "shape", target))
            continue
        targets[target] = (module, entry)
    return targets, problems
