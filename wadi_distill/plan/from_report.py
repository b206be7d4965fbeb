"""Plans from a ``wadi-probe`` report: per layer the rank its angle field needs, shared out under a budget.

The steps, each one function: check that the report belongs to the model (:func:`_check_report_fits`), keep the
layers that can be planned (:func:`_usable_records`), turn each into a candidate with the rank its energy
threshold asks for (:func:`_candidates`), then grow ranks greedily where captured energy per parameter is
largest until the budget is spent (:func:`_allocate`), and write the plan with what was left out and why.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from wadi_distill.lorad.config import adapter_param_count
from wadi_distill.plan.models import backbone_param_count, weight_layers
from wadi_distill.plan.plan import Plan, PlanEntry
from wadi_probe.errors import WadiInputError
from wadi_probe.report.schema import load_report

__all__ = ["plan_from_report"]

_PLANNED_KINDS = ("linear", "conv", "conv1x1")


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
        return adapter_param_count(self.shape, 1)  # a LoRaD rank costs r·(out + ⌊fan_in/2⌋), linear in r

    def energy_at(self, k: int) -> float:
        return 0.0 if k <= 0 else float(self.curve[min(k, len(self.curve)) - 1])


def _round_up(k: int, multiple: int) -> int:
    return k if multiple <= 1 else int(math.ceil(k / multiple) * multiple)


def _record_module(record: Mapping[str, Any]) -> str:
    return record.get("module") or str(record.get("name", "")).rsplit(".", 1)[0]


def _check_settings(budget: float, threshold: float, min_rank: int, max_rank: int | None, multiple_of: int) -> None:
    if not (0.0 < float(budget) <= 1.0):
        raise WadiInputError(f"the budget must be a fraction of the backbone in (0, 1], got {budget}.")
    if not (0.0 < float(threshold) <= 1.0):
        raise WadiInputError(f"the energy threshold must be in (0, 1], got {threshold}.")
    if min_rank < 1 or (max_rank is not None and max_rank < min_rank) or multiple_of < 1:
        raise WadiInputError(f"rank bounds are inconsistent: min_rank={min_rank}, max_rank={max_rank}, multiple_of={multiple_of}.")


def _check_report_fits(model: nn.Module, records: list[Mapping[str, Any]], layers: Mapping[str, nn.Module]) -> None:
    """Refuse a report made for another architecture (most layers differ) or one naming layers the model lacks."""
    missing, mismatched = [], []
    for r in records:
        module = _record_module(r)
        if module not in layers:
            missing.append(module)
        elif r.get("shape") is not None and tuple(int(s) for s in r["shape"]) != tuple(layers[module].weight.shape):
            mismatched.append(f"{module} {tuple(r['shape'])} vs {tuple(layers[module].weight.shape)}")
    bad = missing + mismatched
    if len(bad) > len(records) / 2:
        raise WadiInputError(
            f"the report looks like another architecture than {type(model).__name__}: "
            f"{len(bad)} of {len(records)} layers do not match (e.g. {', '.join(bad[:3])})."
        )
    if bad:
        more = len(bad) - 5
        raise WadiInputError(
            f"the report names layers the teacher lacks or shapes it differs in: {', '.join(bad[:5])}"
            + (f" and {more} more" if more > 0 else "") + "."
        )


def _usable_records(records: list[Mapping[str, Any]], layers: Mapping[str, nn.Module], kinds: tuple[type, ...],
                    skipped: list[tuple[str, str]]) -> list[tuple[str, Mapping[str, Any], list[float]]]:
    """(module, record, energy curve) of the layers that can be planned; the others go to ``skipped``."""
    usable = []
    for r in records:
        module = _record_module(r)
        if not isinstance(layers[module], kinds):
            skipped.append((module, "Conv2d layer (pass include_conv to plan convolutions)"))
        elif r.get("identical"):
            skipped.append((module, "identical in teacher and student"))
        elif r.get("rounding_level"):
            skipped.append((module, f"changed only at the rounding level of {r.get('compared_dtype')}"))
        elif not r.get("lorad_energy"):
            skipped.append((module, "the report has no angle spectrum for it (run the probe with spectra)"))
        else:
            usable.append((module, r, [float(v) for v in r["lorad_energy"]]))
    return usable


def _candidates(usable: list[tuple[str, Mapping[str, Any], list[float]]], layers: Mapping[str, nn.Module], *,
                threshold: float, min_rank: int, max_rank: int | None, multiple_of: int, freeze_below: float,
                skipped: list[tuple[str, str]]) -> list[_Candidate]:
    """One candidate per layer that changed direction enough, with its needed rank and its cap."""
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
    return candidates


def _allocate(candidates: list[_Candidate], limit: int, min_rank: int, multiple_of: int) -> dict[str, int]:
    """Grow ranks ``multiple_of`` at a time where weighted energy gained per parameter is largest, within ``limit``."""
    ranks = {c.module: 0 for c in candidates}

    def next_step(c: _Candidate) -> tuple[float, int, int] | None:
        k = ranks[c.module]
        if k >= c.cap:
            return None
        k_new = min(_round_up(min_rank, multiple_of), c.cap) if k == 0 else min(k + multiple_of, c.cap)
        cost = (k_new - k) * c.per_rank
        return c.weight * (c.energy_at(k_new) - c.energy_at(k)) / cost, k_new, cost

    heap: list[tuple[float, int, int, int]] = []
    for i, c in enumerate(candidates):
        step = next_step(c)
        if step is not None:
            heapq.heappush(heap, (-step[0], i, step[1], step[2]))
    spent = 0
    while heap:
        _, i, k_new, cost = heapq.heappop(heap)
        c = candidates[i]
        if spent + cost > limit:
            continue
        ranks[c.module] = k_new
        spent += cost
        step = next_step(c)
        if step is not None:
            heapq.heappush(heap, (-step[0], i, step[1], step[2]))
    return ranks


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
    _check_settings(budget, threshold, min_rank, max_rank, multiple_of)
    layers = dict(weight_layers(model, (nn.Linear, nn.Conv2d)))
    records = [r for r in data["layers"] if isinstance(r, Mapping) and r.get("kind") in _PLANNED_KINDS]
    if not records:
        raise WadiInputError("the report has no linear or conv layers to plan from.")
    _check_report_fits(model, records, layers)
    skipped: list[tuple[str, str]] = []
    notes: list[str] = []
    kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d) if include_conv else (nn.Linear,)
    usable = _usable_records(records, layers, kinds, skipped)
    if freeze_below is None:
        changes = sorted(float(r.get("direction_change_mean") or 0.0) for _, r, _ in usable)
        freeze_below = 0.05 * changes[len(changes) // 2] if changes else 0.0
        notes.append(f"layers with mean direction change below {freeze_below:.3g} (5% of the median) left frozen")
    candidates = _candidates(usable, layers, threshold=threshold, min_rank=min_rank, max_rank=max_rank,
                             multiple_of=multiple_of, freeze_below=freeze_below, skipped=skipped)
    backbone = backbone_param_count(model)
    limit = int(float(budget) * backbone)
    cheapest = min(min(_round_up(min_rank, multiple_of), c.cap) * c.per_rank for c in candidates)
    if cheapest > limit:
        raise WadiInputError(
            f"a budget of {budget:g} × {backbone:,} = {limit:,} parameters cannot hold even one layer at rank "
            f"{min_rank} (the smallest needs {cheapest:,})."
        )
    ranks = _allocate(candidates, limit, min_rank, multiple_of)
    notes.insert(0, f"threshold {threshold:g} of angle-field energy, budget {budget:g} of {backbone:,} = {limit:,} parameters")
    entries = _entries(candidates, ranks, skipped, notes)
    order = {name: i for i, name in enumerate(layers)}
    entries.sort(key=lambda e: order[e.module])
    return Plan(entries, source="report", notes=notes, skipped=skipped, model_class=type(model).__name__, backbone_params=backbone)


def _entries(candidates: list[_Candidate], ranks: Mapping[str, int], skipped: list[tuple[str, str]],
             notes: list[str]) -> list[PlanEntry]:
    """The plan's entries from the allocated ranks; layers left at rank 0 and budget cuts noted."""
    entries: list[PlanEntry] = []
    for c in candidates:
        k = ranks[c.module]
        if k == 0:
            skipped.append((c.module, f"no budget left (needed rank {c.needed})"))
            continue
        entries.append(PlanEntry(c.module, k, k * c.per_rank, c.shape, needed_rank=c.needed, energy=round(c.energy_at(k), 4)))
    reduced = [c.module for c in candidates if 0 < ranks[c.module] < c.cap]
    if reduced:
        notes.append(f"{len(reduced)} layers got less than their needed rank because of the budget")
    if not reduced and not any(r == 0 for r in ranks.values()):
        notes.append("every layer got the rank its threshold asks for within the budget")
    return entries
