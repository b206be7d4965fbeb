"""A LoRaD plan: which layers get an adapter and at what rank, with each entry's parameter count.

A plan is a list of (module name, rank) with the parameter count r·(out + ⌊fan_in/2⌋) of each entry, the notes
that explain how it was chosen and the layers left out and why. It is plain data (JSON in, JSON out); the two
ways of making one are :mod:`wadi_distill.plan.presets` and :mod:`wadi_distill.plan.from_report`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from wadi_probe.errors import WadiInputError
from wadi_probe.io.atomic import write_json_atomic
from wadi_probe.io.jsonfile import read_json

__all__ = ["PLAN_SCHEMA_VERSION", "PlanEntry", "Plan", "lorad_params_for"]

PLAN_SCHEMA_VERSION = 1


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
        """{module: rank}, the form :func:`wadi_distill.lorad.model.inject_lorad` also accepts."""
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
