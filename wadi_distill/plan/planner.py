"""Plans: which layers get a LoRaD adapter and at what rank.

A plan is a list of (module name, rank) with the parameter count r·(out + ⌊fan_in/2⌋) of each entry. Two ways
to make one:

* :func:`plan_from_preset` — the paper's setup (``"paper"``): every ``nn.Linear`` inside the down/mid/up blocks of
  a UNet (the transformer blocks of a DiT), one rank for all.
* :func:`plan_from_report` — from a ``wadi-probe`` report: per layer the rank its LoRaD angle field needs to reach
  an energy threshold, layers whose direction hardly changed left frozen, then ranks shared out under a parameter
  budget so that the captured angle energy is as large as possible.

Models only need their shapes here, so :func:`load_model_config_only` builds them on the meta device from a
``config.json`` (no weights, no memory).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from wadi_probe.io.atomic import write_json_atomic
from wadi_probe.errors import WadiInputError
from wadi_probe.io.jsonfile import read_json
from wadi_probe.report.schema import load_report

__all__ = [
    "PlanEntry",
    "Plan",
    "PRESETS",
    "lorad_params_for",
    "plan_from_preset",
    "plan_from_report",
    "load_model_config_only",
    "load_planning_model",
    "backbone_param_count",
]

PLAN_SCHEMA_VERSION = 1
PRESETS = ("paper", "paper-conv", "all-linear")
_BLOCK_ROOTS = ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "single_transformer_blocks")


def lorad_params_for(shape: tuple[int, ...] | list[int], rank: int) -> int:
    """Trainable numbers of a LoRaD adapter of ``rank`` on a weight of ``shape``: r·(out + ⌊fan_in/2⌋)."""
    out = int(shape[0])
    fan_in = math.prod(int(s) for s in shape[1:])
    return int(rank) * (out + fan_in // 2)


@dataclass
class PlanEntry:
    """One adapted layer: module path, rank, parameter count and the base weight's shape."""

    module: str
    rank: int
    params: int
    shape: tuple[int, ...]
    needed_rank: int | None = None  # rank the report asked for (threshold), before bounds and budget
    energy: float | None = None  # fraction of the layer's angle-field energy the rank captures (from a report)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"module": self.module, "rank": self.rank, "params": self.params, "shape": list(self.shape)}
        if self.needed_rank is not None:
            data["needed_rank"] = self.needed_rank
        if self.energy is not None:
            data["energy"] = self.energy
        return data


@dataclass
class Plan:
    """Which layers get which LoRaD rank; saves/loads as JSON and prints as a table."""

    layers: list[PlanEntry]
    source: str
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    model_class: str | None = None
    backbone_params: int | None = None

    @property
    def trainable_params(self) -> int:
        """Total trainable numbers of the adapter this plan describes."""
        return sum(e.params for e in self.layers)

    @property
    def fraction(self) -> float | None:
        """Trainable parameters as a fraction of the backbone's (None when unknown)."""
        return self.trainable_params / self.backbone_params if self.backbone_params else None

    def ranks(self) -> dict[str, int]:
        """{module: rank}, the form :func:`wadi_distill.lorad.layer.inject_lorad` also accepts."""
        return {e.module: e.rank for e in self.layers}

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "tool": "wadi-distill plan",
            "source": self.source,
            "model_class": self.model_class,
            "backbone_params": self.backbone_params,
            "trainable_params": self.trainable_params,
            "fraction": self.fraction,
            "layers": [e.to_json() for e in self.layers],
            "skipped": [{"module": m, "reason": r} for m, r in self.skipped],
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Plan":
        """Rebuild a plan from :meth:`to_json` output; malformed data raises :class:`WadiInputError`."""
        if not isinstance(data, Mapping) or "layers" not in data:
            raise WadiInputError("this is not a LoRaD plan (no 'layers' list).")
        version = data.get("schema_version", PLAN_SCHEMA_VERSION)
        if version != PLAN_SCHEMA_VERSION:
            raise WadiInputError(f"plan schema_version {version!r} is not supported (this version reads {PLAN_SCHEMA_VERSION}).")
        try:
            layers = [
                PlanEntry(
                    module=str(e["module"]),
                    rank=int(e["rank"]),
                    params=int(e.get("params") if e.get("params") is not None else lorad_params_for(e["shape"], e["rank"])),
                    shape=tuple(int(s) for s in e.get("shape", ())),
                    needed_rank=e.get("needed_rank"),
                    energy=e.get("energy"),
                )
                for e in data["layers"]
            ]
            skipped = [(str(s["module"]), str(s["reason"])) for s in data.get("skipped", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise WadiInputError(f"the plan's layer list is malformed ({exc}).") from None
        return cls(
            layers=layers,
            source=str(data.get("source", "unknown")),
            notes=[str(n) for n in data.get("notes", [])],
            skipped=skipped,
            model_class=data.get("model_class"),
            backbone_params=data.get("backbone_params"),
        )

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON, atomically."""
        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise WadiInputError(f"plan file {path} does not exist.")
        data = read_json(path)
        return cls.from_json(data)

    def to_table(self, *, max_rows: int | None = 40):
        """A rich table of the entries (the first ``max_rows``; totals in the caption)."""
        from rich.table import Table

        table = Table(title=f"LoRaD plan ({self.source})", show_lines=False)
        table.add_column("module")
        table.add_column("shape", justify="right")
        table.add_column("rank", justify="right")
        table.add_column("params", justify="right")
        with_energy = any(e.energy is not None for e in self.layers)
        if with_energy:
            table.add_column("needed", justify="right")
            table.add_column("energy", justify="right")
        shown = self.layers if max_rows is None else self.layers[:max_rows]
        for e in shown:
            row = [e.module, "×".join(str(s) for s in e.shape), str(e.rank), f"{e.params:,}"]
            if with_energy:
                row += [str(e.needed_rank) if e.needed_rank is not None else "", f"{e.energy:.1%}" if e.energy is not None else ""]
            table.add_row(*row)
        if len(shown) < len(self.layers):
            table.add_row(f"… {len(self.layers) - len(shown)} more", "", "", "")
        fraction = f" = {self.fraction:.2%} of {self.backbone_params:,}" if self.fraction is not None else ""
        table.caption = f"{len(self.layers)} layers, {self.trainable_params:,} trainable parameters{fraction}"
        return table


# ------------------------------------------------------------------------------------------------ models
def backbone_param_count(model: nn.Module) -> int:
    """Parameters of the backbone (adapter parameters excluded), works on the meta device."""
    return sum(p.numel() for n, p in model.named_parameters() if ".lorad_" not in n and ".lora_" not in n)


def _weight_layers(model: nn.Module, kinds: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    from wadi_distill.lorad.layer import LoRaDLayer

    found = []
    for name, module in model.named_modules():
        base = module.base_layer if isinstance(module, LoRaDLayer) else module
        if isinstance(base, kinds) and not _inside_wrapper(name, model):
            found.append((name, base))
    return found


def _inside_wrapper(name: str, model: nn.Module) -> bool:
    return name.endswith(".base_layer") or ".base_layer." in name


def _model_class(model: nn.Module) -> str:
    return type(model).__name__


def plan_from_preset(model: nn.Module, rank: int, preset: str = "paper") -> Plan:
    """A uniform-rank plan.

    ``"paper"``: every ``nn.Linear`` inside ``down_blocks``/``mid_block``/``up_blocks`` (UNet) or
    ``transformer_blocks`` (DiT) — SD1.5 at rank 256 gives 182 layers and 83,795,968 parameters.
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
    for name, layer in _weight_layers(model, (nn.Linear, nn.Conv2d)):
        shape = tuple(layer.weight.shape)
        in_blocks = name.split(".", 1)[0] in _BLOCK_ROOTS
        wanted = isinstance(layer, kinds) and (in_blocks or preset == "all-linear")
        if wanted and math.prod(shape[1:]) >= 2:
            # The paper keeps one rank everywhere, even above a layer's full rank min(out, ⌊fan_in/2⌋)
            # (e.g. r=256 on 320×320): the counts it reports include those factors, so do we.
            entries.append(PlanEntry(name, int(rank), lorad_params_for(shape, int(rank)), shape))
        elif isinstance(layer, nn.Linear):
            skipped.append((name, "outside the down/mid/up or transformer blocks"))
    if not entries:
        raise WadiInputError(
            f"preset {preset!r} found no layer to adapt in {_model_class(model)} "
            "(expected down_blocks/mid_block/up_blocks or transformer_blocks)."
        )
    convs = sum(1 for _, layer in _weight_layers(model, (nn.Conv2d,)))
    notes = [f"preset {preset}, rank {rank} on every layer"]
    if preset != "paper-conv" and convs:
        notes.append(f"{convs} Conv2d layers left frozen (the paper adapts Linear layers only)")
    above = [e.module for e in entries if e.rank > min(e.shape[0], math.prod(e.shape[1:]) // 2)]
    if above:
        notes.append(f"{len(above)} layers have rank {rank} above their full rank min(out, fan_in/2), as in the paper")
    return Plan(entries, source=f"preset:{preset}:r{rank}", notes=notes, skipped=skipped,
                model_class=_model_class(model), backbone_params=backbone_param_count(model))


# ------------------------------------------------------------------------------------------------ reports
def _report_data(report: Any) -> dict[str, Any]:
    """The report as a validated dict (a Report object, a dict, or a path to report.json)."""
    if isinstance(report, (str, Path)):
        report = load_report(report)
    data = getattr(report, "data", report)
    if not isinstance(data, Mapping):
        raise WadiInputError("the report is not a JSON object.")
    version = data.get("schema_version")
    if version not in (1, 2):
        raise WadiInputError(f"report schema_version {version!r} is not supported (this version reads 1 and 2).")
    if not isinstance(data.get("layers"), list):
        raise WadiInputError("the report has no 'layers' list.")
    return dict(data)


@dataclass
class _Candidate:
    module: str
    shape: tuple[int, ...]
    curve: list[float]
    weight: float
    needed: int
    cap: int  # the rank growth stops at: needed rank rounded and clipped to the bounds and full rank

    @property
    def per_rank(self) -> int:
        return self.shape[0] + math.prod(self.shape[1:]) // 2

    def energy_at(self, k: int) -> float:
        return 0.0 if k <= 0 else float(self.curve[min(k, len(self.curve)) - 1])


def _round_up(k: int, multiple: int) -> int:
    return k if multiple <= 1 else int(math.ceil(k / multiple) * multiple)


def plan_from_report(
    model: nn.Module,
    report: Any,
    *,
    budget: float = 0.10,
    threshold: float = 0.9,
    min_rank: int = 8,
    max_rank: int | None = None,
    multiple_of: int = 8,
    freeze_below: float | None = None,
    include_conv: bool = False,
) -> Plan:
    """Ranks chosen from a probe report and shared out under a parameter budget.

    1. Each Linear layer (and Conv2d with ``include_conv``) of the report needs the smallest rank k whose
       cumulative LoRaD angle-field energy reaches ``threshold`` (rounded up to ``multiple_of``, clipped to
       [``min_rank``, ``max_rank``] and the layer's full rank).
    2. Layers whose mean direction change is below ``freeze_below`` (default: 5 % of the median over layers)
       or that are identical are left frozen.
    3. Ranks grow greedily, ``multiple_of`` at a time, always where the captured energy per added parameter is
       largest, until every layer has its needed rank or ``budget`` (a fraction of the backbone's parameters)
       is spent. A layer's energy counts with weight out·direction_change_mean (its total direction change),
       so layers that moved more matter more. The plan records every layer left out and why.
    """
    data = _report_data(report)
    if not (0.0 < float(budget) <= 1.0):
        raise WadiInputError(f"the budget must be a fraction of the backbone in (0, 1], got {budget}.")
    if not (0.0 < float(threshold) <= 1.0):
        raise WadiInputError(f"the energy threshold must be in (0, 1], got {threshold}.")
    if min_rank < 1 or (max_rank is not None and max_rank < min_rank) or multiple_of < 1:
        raise WadiInputError(f"rank bounds are inconsistent: min_rank={min_rank}, max_rank={max_rank}, multiple_of={multiple_of}.")
    kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d) if include_conv else (nn.Linear,)
    layers = dict(_weight_layers(model, (nn.Linear, nn.Conv2d)))
    records = [r for r in data["layers"] if isinstance(r, Mapping) and r.get("kind") in ("linear", "conv", "conv1x1")]
    if not records:
        raise WadiInputError("the report has no linear or conv layers to plan from.")

    # --- does the report belong to this model?
    missing, mismatched = [], []
    for r in records:
        module = r.get("module") or str(r.get("name", "")).rsplit(".", 1)[0]
        if module not in layers:
            missing.append(module)
        elif r.get("shape") is not None and tuple(int(s) for s in r["shape"]) != tuple(layers[module].weight.shape):
            mismatched.append(f"{module} {tuple(r['shape'])} vs {tuple(layers[module].weight.shape)}")
    if len(missing) + len(mismatched) > len(records) / 2:
        shown = ", ".join((missing + mismatched)[:3])
        raise WadiInputError(
            f"the report looks like another architecture than {_model_class(model)}: "
            f"{len(missing) + len(mismatched)} of {len(records)} layers do not match (e.g. {shown})."
        )
    if missing or mismatched:
        shown = ", ".join((missing + mismatched)[:5])
        more = len(missing) + len(mismatched) - 5
        raise WadiInputError(
            f"the report names layers the teacher lacks or shapes it differs in: {shown}"
            + (f" and {more} more" if more > 0 else "") + "."
        )

    # --- candidates and what was left out
    skipped: list[tuple[str, str]] = []
    notes: list[str] = []
    usable = []
    for r in records:
        module = r.get("module") or str(r["name"]).rsplit(".", 1)[0]
        if not isinstance(layers[module], kinds):
            skipped.append((module, "Conv2d layer (pass include_conv to plan convolutions)"))
            continue
        if r.get("identical"):
            skipped.append((module, "identical in teacher and student"))
            continue
        if r.get("rounding_level"):
            skipped.append((module, f"changed only at the rounding level of {r.get('compared_dtype')}"))
            continue
        curve = r.get("lorad_energy")
        if not curve:
            skipped.append((module, "the report has no angle spectrum for it (run the probe with spectra)"))
            continue
        usable.append((module, r, [float(v) for v in curve]))
    changes = sorted(float(r.get("direction_change_mean") or 0.0) for _, r, _ in usable)
    if freeze_below is None:
        freeze_below = 0.05 * changes[len(changes) // 2] if changes else 0.0
        notes.append(f"layers with mean direction change below {freeze_below:.3g} (5% of the median) left frozen")
    candidates: list[_Candidate] = []
    for module, r, curve in usable:
        dc = float(r.get("direction_change_mean") or 0.0)
        if dc <= 0.0 or dc < freeze_below:
            skipped.append((module, f"direction hardly changed (mean 1-cos {dc:.2e})"))
            continue
        shape = tuple(int(s) for s in layers[module].weight.shape)
        full = min(shape[0], math.prod(shape[1:]) // 2, len(curve))
        needed = next((k + 1 for k, v in enumerate(curve) if v >= threshold - 1e-12), len(curve))
        upper = full if max_rank is None else min(full, max_rank)
        target = max(min(_round_up(needed, multiple_of), upper), min(min_rank, upper))
        candidates.append(_Candidate(module, shape, curve, dc * shape[0], needed, min(target, upper)))
    if not candidates:
        raise WadiInputError("no layer in the report changed direction enough to adapt; nothing to plan.")

    # --- greedy allocation under the budget
    backbone = backbone_param_count(model)
    limit = int(float(budget) * backbone)
    cheapest = min(min(_round_up(min_rank, multiple_of), c.cap) * c.per_rank for c in candidates)
    if cheapest > limit:
        raise WadiInputError(
            f"a budget of {budget:g} × {backbone:,} = {limit:,} parameters cannot hold even one layer at rank "
            f"{min_rank} (the smallest needs {cheapest:,})."
        )
    ranks = {c.module: 0 for c in candidates}

    def next_step(c: _Candidate) -> tuple[float, int, int] | None:
        k = ranks[c.module]
        if k >= c.cap:
            return None
        k_new = min(_round_up(min_rank, multiple_of), c.cap) if k == 0 else min(k + multiple_of, c.cap)
        cost = (k_new - k) * c.per_rank
        gain = c.weight * (c.energy_at(k_new) - c.energy_at(k))
        return gain / cost, k_new, cost

    spent = 0
    heap: list[tuple[float, int, int, int]] = []
    for i, c in enumerate(candidates):
        step = next_step(c)
        if step is not None:
            heapq.heappush(heap, (-step[0], i, step[1], step[2]))
    budget_bound: set[str] = set()
    while heap:
        _, i, k_new, cost = heapq.heappop(heap)
        c = candidates[i]
        if spent + cost > limit:
            budget_bound.add(c.module)
            continue
        ranks[c.module] = k_new
        spent += cost
        step = next_step(c)
        if step is not None:
            heapq.heappush(heap, (-step[0], i, step[1], step[2]))

    entries: list[PlanEntry] = []
    for c in candidates:
        k = ranks[c.module]
        if k == 0:
            skipped.append((c.module, f"no budget left (needed rank {c.needed})"))
            continue
        entries.append(PlanEntry(c.module, k, k * c.per_rank, c.shape, needed_rank=c.needed, energy=round(c.energy_at(k), 4)))
    reduced = [c.module for c in candidates if 0 < ranks[c.module] < c.cap]
    notes.insert(0, f"threshold {threshold:g} of angle-field energy, budget {budget:g} of {backbone:,} = {limit:,} parameters")
    if reduced:
        notes.append(f"{len(reduced)} layers got less than their needed rank because of the budget")
    if not reduced and not any(r == 0 for r in ranks.values()):
        notes.append("every layer got the rank its threshold asks for within the budget")
    order = {name: i for i, (name, _) in enumerate(layers.items())}
    entries.sort(key=lambda e: order[e.module])
    return Plan(entries, source="report", notes=notes, skipped=skipped, model_class=_model_class(model), backbone_params=backbone)


# -------------------------------------------------------------------------------------------- config only
def _model_folder(path: Path) -> Path:
    """The folder holding the denoiser's config.json, for a model folder or a pipeline root."""
    if (path / "model_index.json").is_file() or not (path / "config.json").is_file():
        for sub in ("unet", "transformer"):
            if (path / sub / "config.json").is_file():
                return path / sub
    if (path / "config.json").is_file():
        return path
    raise WadiInputError(f"{path} has no config.json (nor unet/ or transformer/ with one); it is not a diffusers model folder.")


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The denoiser's config dict of a model folder or pipeline root (a config.json path works too)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WadiInputError(f"{path} does not exist.")
    config_path = path if path.is_file() else _model_folder(path) / "config.json"
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise WadiInputError(f"{config_path} is not a model config.")
    return config


def model_from_config(config: Mapping[str, Any], *, device: str | torch.device = "meta") -> nn.Module:
    """Build the diffusers model a config describes (``_class_name``, default UNet2DConditionModel) on ``device``."""
    import diffusers

    class_name = config.get("_class_name", "UNet2DConditionModel")
    cls = getattr(diffusers, str(class_name), None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise WadiInputError(f"the config names model class {class_name!r}, which is not a diffusers model class.")
    try:
        with torch.device(device):
            return cls.from_config(dict(config))
    except (TypeError, ValueError) as exc:
        raise WadiInputError(f"cannot build {class_name} from this config ({exc}).") from None


def load_model_config_only(path: str | Path) -> nn.Module:
    """A meta-device model (shapes, no weights) from a config.json folder or a pipeline root."""
    return model_from_config(read_model_config(path))


def load_planning_model(spec: str | Path) -> nn.Module:
    """The model a plan is made for: ``builtin:<name>`` or a digits-teacher folder (small, loaded for real),
    else a diffusers model folder / pipeline root built config-only on the meta device."""
    from wadi_distill.builtin.digits import model as models

    if isinstance(spec, str) and spec.startswith(models.BUILTIN_PREFIX):
        return models.load_teacher(spec).unet
    path = Path(spec).expanduser()
    if path.is_dir() and (path / models.TEACHER_CONFIG_FILE).is_file() and not (path / "config.json").is_file():
        return models.load_teacher_dir(path).unet
    return load_model_config_only(path)
