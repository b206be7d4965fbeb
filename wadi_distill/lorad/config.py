"""The settings of one LoRaD adapter, and their file form ``adapter_config.json``.

Field names follow PEFT's ``LoraConfig`` where they mean the same thing, so that a reader who knows PEFT finds
them where they expect: ``r`` (the rank), ``target_modules`` (the adapted layers), ``rank_pattern`` (per-layer
ranks that differ from ``r``), ``base_model_name_or_path`` and ``peft_type``. The other fields are LoRaD's own
and documented on :class:`LoRaDConfig`.

Files written before this config existed (``"version": 1``: ``kind``, ``layers`` {module: {rank, shape}},
``scales``) still load: :meth:`LoRaDConfig.from_dict` reads both forms.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from wadi_probe.errors import WadiInputError

__all__ = ["ADAPTER_CONFIG", "ADAPTER_FORMAT", "ADAPTER_VERSION", "ADAPTER_WEIGHTS", "ADAPTER_KINDS", "COUNTED_KINDS",
           "INITS", "LoRaDConfig", "adapter_param_count"]

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "wadi-lorad-adapter"
ADAPTER_VERSION = 2
_READABLE_VERSIONS = (1, 2)
ADAPTER_KINDS = ("lorad", "lora")
INITS = ("zeros_xavier", "random")
COUNTED_KINDS = ("lorad", "lora", "dora")  # ADAPTER_KINDS and PEFT's DoRA, the baseline the quality study trains


def adapter_param_count(shape: tuple[int, ...] | list[int], rank: int, kind: str = "lorad") -> int:
    """Trainable numbers of one adapter of ``rank`` on a weight of ``shape`` (out, in, *kernel).

    The one count the planner, the adapter files and the PEFT baselines use, with fan_in = in·∏kernel:

    - ``"lorad"``: A (out, r) and B (r, ⌊fan_in/2⌋), so r·(out + ⌊fan_in/2⌋);
    - ``"lora"``: A (r, fan_in) and B (out, r), so r·(out + fan_in);
    - ``"dora"``: LoRA's factors plus one magnitude per output row, r·(out + fan_in) + out.
    """
    if kind not in COUNTED_KINDS:
        raise WadiInputError(f"unknown adapter kind {kind!r} to count; use one of {', '.join(COUNTED_KINDS)}.")
    out = int(shape[0])
    fan_in = math.prod(int(s) for s in shape[1:])
    if kind == "lorad":
        return int(rank) * (out + fan_in // 2)
    return int(rank) * (out + fan_in) + (out if kind == "dora" else 0)


@dataclass
class LoRaDConfig:
    """Everything that defines a LoRaD (or plain LoRA) adapter apart from its trained factors.

    PEFT's names:

    - ``r``: the rank of every adapted layer not named in ``rank_pattern``.
    - ``target_modules``: full module paths of the adapted ``nn.Linear`` / ``nn.Conv2d`` layers, in model order.
    - ``rank_pattern``: {module path: rank} for the layers whose rank is not ``r`` (a key may also be a PEFT-style
      name suffix or regex, matched against the end of the module path).
    - ``base_model_name_or_path``: the teacher the adapter was trained on (a folder or ``builtin:digits``).

    LoRaD's own:

    - ``kind``: ``"lorad"`` (rotation: W' = R_Θ(W), Θ = A·B) or ``"lora"`` (W' = W + scale·B·A, the fake score's
      plain LoRA option).
    - ``init``: ``"zeros_xavier"`` (A = 0, B Xavier: a fresh adapter is exactly the teacher) or ``"random"``.
    - ``lora_scale``: the ``scale`` of a ``"lora"`` adapter (ignored for LoRaD, whose rotation has no scale).
    - ``layer_shapes``: {module path: base weight shape}, so that a base of another shape is refused by name.
    - ``base_signature``: 16 hex digits of SHA-256 over the base's weight names and shapes; ``strict_base``
      refuses a base whose signature differs even when the adapted layers fit.
    - ``model_class``: the denoiser's class name (e.g. ``UNet2DConditionModel``), for messages.
    - ``plan``: the record of the plan the adapter was made from (a plan's JSON form), kept as it is; the
      planner (:mod:`wadi_distill.plan`) makes a config with ``Plan.to_config()`` and reads a plan back with
      ``Plan.from_config()``; nothing here looks inside it.
    - ``trainable_params``: the number of trained numbers, Σ :func:`adapter_param_count` over the layers.
    """

    r: int = 8
    target_modules: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    kind: str = "lorad"
    init: str = "zeros_xavier"
    lora_scale: float = 1.0
    layer_shapes: dict[str, list[int]] = field(default_factory=dict)
    base_signature: str | None = None
    strict_base: bool = True
    model_class: str | None = None
    adapter_name: str = "default"
    plan: dict[str, Any] | None = None
    trainable_params: int | None = None
    peft_type: str = "LORAD"

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise WadiInputError(f"unknown adapter kind {self.kind!r}; use one of {', '.join(ADAPTER_KINDS)}.")
        if self.init not in INITS:
            raise WadiInputError(f"unknown init {self.init!r}; use one of {', '.join(INITS)}.")
        ranks = [int(self.r), *(int(v) for v in self.rank_pattern.values())]
        if min(ranks) < 1:
            raise WadiInputError(f"every rank must be at least 1, got {min(ranks)}.")

    # ------------------------------------------------------------------------------------------------ ranks
    def rank_of(self, module: str) -> int:
        """The rank of ``module``: its ``rank_pattern`` entry (exact path, else PEFT's suffix match), else ``r``."""
        if module in self.rank_pattern:
            return int(self.rank_pattern[module])
        for pattern, rank in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return int(rank)
        return int(self.r)

    def ranks(self) -> dict[str, int]:
        """{module: rank} for every target module, in order (the form ``inject_lorad`` takes)."""
        return {module: self.rank_of(module) for module in self.target_modules}

    @classmethod
    def from_ranks(cls, ranks: Mapping[str, int], **fields: Any) -> "LoRaDConfig":
        """A config for {module: rank}: ``r`` is the most common rank, ``rank_pattern`` lists the others."""
        ranks = {str(m): int(k) for m, k in ranks.items()}
        r = Counter(ranks.values()).most_common(1)[0][0] if ranks else int(fields.pop("r", 8))
        fields.pop("r", None)
        pattern = {m: k for m, k in ranks.items() if k != r}
        return cls(r=r, target_modules=list(ranks), rank_pattern=pattern, **fields)

    # ------------------------------------------------------------------------------------------- file form
    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` object (with ``format`` and ``version`` so readers can tell it apart)."""
        return {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path = "adapter_config.json") -> "LoRaDConfig":
        """Read a config object of either version; anything else is refused with one sentence."""
        if not isinstance(data, Mapping) or data.get("format") != ADAPTER_FORMAT:
            raise WadiInputError(f"{source} is not a wadi LoRaD adapter config.")
        version = data.get("version")
        if version not in _READABLE_VERSIONS:
            raise WadiInputError(
                f"adapter format version {version!r} is not supported (this version reads "
                f"{', '.join(map(str, _READABLE_VERSIONS))})."
            )
        try:
            return cls._from_v1(data) if version == 1 else cls._from_v2(data)
        except (TypeError, ValueError, AttributeError) as exc:
            raise WadiInputError(f"{source} is malformed ({exc}).") from None

    @classmethod
    def _from_v2(cls, data: Mapping[str, Any]) -> "LoRaDConfig":
        known = set(cls.__dataclass_fields__)
        fields = {k: v for k, v in data.items() if k in known}  # newer, unknown keys are left aside
        fields["target_modules"] = [str(m) for m in fields.get("target_modules") or []]
        fields["rank_pattern"] = {str(m): int(k) for m, k in (fields.get("rank_pattern") or {}).items()}
        fields["layer_shapes"] = {str(m): [int(s) for s in v] for m, v in (fields.get("layer_shapes") or {}).items()}
        return cls(**fields)

    @classmethod
    def _from_v1(cls, data: Mapping[str, Any]) -> "LoRaDConfig":
        layers = data.get("layers") or {}
        scales = data.get("scales") or {}
        return cls.from_ranks(
            {m: int(v["rank"]) for m, v in layers.items()},
            kind=str(data.get("kind", "lorad")),
            lora_scale=float(next(iter(scales.values()), 1.0)),
            layer_shapes={m: [int(s) for s in v.get("shape", [])] for m, v in layers.items()},
            base_signature=data.get("base_signature"),
            strict_base=bool(data.get("strict_base", True)),
            model_class=data.get("model_class"),
            adapter_name=str(data.get("adapter_name", "default")),
            plan=data.get("plan"),
            trainable_params=data.get("trainable_params"),
        )

    def save(self, folder: str | Path) -> Path:
        """Write ``adapter_config.json`` into ``folder`` (atomically) and return its path."""
        from wadi_probe.io.atomic import write_json_atomic

        return write_json_atomic(Path(folder) / ADAPTER_CONFIG, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "LoRaDConfig":
        """Read ``adapter_config.json`` (or the folder holding it)."""
        from wadi_probe.io.jsonfile import read_json

        path = Path(path).expanduser()
        file = path / ADAPTER_CONFIG if path.is_dir() else path
        if not file.is_file():
            raise WadiInputError(f"{file} does not exist.")
        return cls.from_dict(read_json(file), file)
