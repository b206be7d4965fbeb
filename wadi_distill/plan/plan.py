"""A LoRaD plan: which layers get an adapter and at what rank, with each entry's parameter count.

A plan is a list of (module name, rank) with the parameter count r·(out + ⌊fan_in/2⌋) of each entry, the notes
that explain how it was chosen and the layers left out and why. It is plain data (JSON in, JSON out); the two
ways of making one are :mod:`wadi_distill.plan.presets` and :mod:`wadi_distill.plan.from_report`. The adapter
itself is described by a :class:`~wadi_distill.lorad.config.LoRaDConfig`: :meth:`Plan.to_config` makes one,
:meth:`Plan.from_config` reads the plan back out of one (an adapter folder's config, say).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from wadi_distill.lorad.config import LoRaDConfig, adapter_param_count
from wadi_probe.errors import WadiInputError
from wadi_probe.io.atomic import write_json_atomic
from wadi_probe.io.jsonfile import read_json

__all__ = ["PLAN_SCHEMA_VERSION", "PlanEntry", "Plan"]

PLAN_SCHEMA_VERSION = 1


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
                    params=int(e.get("params") if e.get("params") is not None else adapter_param_count(e["shape"], e["rank"])),
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

    def to_config(self, **fields: Any) -> LoRaDConfig:
        """The :class:`LoRaDConfig` of an adapter made from this plan: its ranks, layer shapes and itself for the record.

        ``fields`` sets the config's other fields (``kind``, ``init``, ``lora_scale``, ``base_model_name_or_path``,
        ...). ``trainable_params`` is counted for the config's kind when every entry knows its shape.
        """
        kind = fields.get("kind", "lorad")
        if "trainable_params" not in fields:
            known = all(e.shape for e in self.layers)
            fields["trainable_params"] = (self.trainable_params if kind == "lorad" else
                                          sum(adapter_param_count(e.shape, e.rank, kind) for e in self.layers)
                                          if known else None)
        fields.setdefault("model_class", self.model_class)
        return LoRaDConfig.from_ranks(self.ranks(), layer_shapes={e.module: list(e.shape) for e in self.layers},
                                      plan=self.to_json(), **fields)

    @classmethod
    def from_config(cls, config: LoRaDConfig, *, source: str = "adapter") -> "Plan":
        """The plan an adapter was made from: the record its config keeps, else one rebuilt from its ranks and shapes.

        A rebuilt plan counts each layer for the config's kind (official WaDi checkpoints carry no plan).
        """
        if config.plan:
            return cls.from_json(config.plan)
        entries = [PlanEntry(module, rank, adapter_param_count(config.layer_shapes[module], rank, config.kind),
                             tuple(config.layer_shapes[module])) for module, rank in config.ranks().items()]
        return cls(entries, source=source, model_class=config.model_class)

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
