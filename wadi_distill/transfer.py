"""Applying a trained adapter to another checkpoint of the teacher's architecture (a community fine-tune).

A LoRaD adapter stores a field of pair angles Θ, not a weight difference, so it can be merged onto any base with
the same shapes: ``R_Θ(W_finetune)``. Because the rotation is linear in the weight,
``R_Θ(W_ft) = R_Θ(W_teacher) + R_Θ(W_ft − W_teacher)``: the student's change is applied exactly as trained, and the
fine-tune's own change ``D = W_ft − W_teacher`` is rotated too, keeping its Frobenius norm exactly (a rotation)
but not its direction. :func:`check_transfer` measures both before an export: how far the base is from the
training teacher (the probe's summary of teacher vs base), and how much of ``D`` survives as it was, the
energy-weighted cosine ``Σ⟨R_Θ(D), D⟩ / Σ‖D‖²`` over all matrices (1: kept exactly; layers the adapter does not
touch keep ``D`` exactly). A LoRA ``W_ft + B·A`` instead keeps ``D`` exactly but adds a difference that was
measured against the teacher (see ``wadi-distill extract-lora``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wadi_probe.errors import WadiInputError
from wadi_probe.io.jsonfile import read_json

__all__ = ["TransferCheck", "training_teacher_of", "check_transfer"]


@dataclass
class TransferCheck:
    """The base an adapter is merged onto, against the teacher it was trained on."""

    base: Path
    training_teacher: str | None
    teacher_found: bool
    same_base: bool
    report: Any | None = None  # wadi_probe Report of teacher vs base, when they differ and the teacher is on disk
    kept_cosine: float | None = None  # Σ⟨R(D), D⟩ / Σ‖D‖² over all matrices
    unreadable: str | None = None  # why the recorded teacher, found on disk, could not be read
    adapted_energy_share: float | None = None  # share of ‖D‖² in the layers the adapter rotates

    def sentences(self) -> list[str]:
        """What an export prints about the base (nothing when it is the training teacher)."""
        if self.same_base:
            return []
        if self.training_teacher is None:
            return [f"the adapter does not record the teacher it was trained on, so {self.base} cannot be compared with it."]
        if self.unreadable is not None:
            return [self.unreadable]
        if not self.teacher_found:
            return [f"the adapter was trained on {self.training_teacher}, which is not on this machine, so how far "
                    f"{self.base} is from it cannot be measured."]
        from wadi_probe.report.summary import headline

        out = [f"{self.base} is not the teacher the adapter was trained on ({self.training_teacher}); "
               f"probe of that teacher vs this base: " + headline(self.report).plain.replace("\n", " ")]
        if self.kept_cosine is not None:
            out.append(
                f"The base's own change from the teacher keeps its norm exactly under the rotation; its direction is "
                f"kept to cosine {self.kept_cosine:.4f} (1 = unchanged, 0 = an unrelated direction; {self.adapted_energy_share:.1%} of that change "
                "lies in rotated layers, the rest is kept exactly)."
            )
        return out


def training_teacher_of(adapter: str | Path) -> str | None:
    """The teacher an adapter folder records: PEFT's ``base_model_name_or_path`` or the run's ``training.json``."""
    found = _training_teacher_record(adapter)
    return found[0] if found else None


def _training_teacher_record(adapter: str | Path) -> tuple[str, str] | None:
    """(the recorded teacher, where it is recorded, e.g. ``adapter_config.json's base_model_name_or_path``)."""
    folder = Path(adapter).expanduser()
    if not folder.is_dir():  # a weights file speaks for its folder only when that folder is an adapter folder
        folder = folder.parent
        if not (folder / "adapter_config.json").is_file():
            return None
    for name, key in (("adapter_config.json", "base_model_name_or_path"), ("training.json", "teacher")):
        if (folder / name).is_file():
            value = read_json(folder / name).get(key)
            if value:
                return str(value), f"{folder / name}'s {key}"
    return None


def _resolve(recorded: str, adapter: Path) -> Path | None:
    """The recorded teacher as a local path (absolute, or relative to the working or adapter folder), if present.

    ``builtin:digits`` (or a ``train-teacher`` folder) is its UNet weights file, which is what ``export`` reads.
    """
    from wadi_probe.builtins import builtin_path, is_builtin

    if is_builtin(recorded):
        try:
            return builtin_path(recorded)
        except WadiInputError:  # a built-in this installation does not ship
            return None
    candidate = Path(recorded).expanduser()
    if candidate.is_absolute():
        return candidate if candidate.exists() else None
    for root in (Path.cwd(), adapter if adapter.is_dir() else adapter.parent):
        found = root / candidate
        if found.exists():
            from wadi_distill.builtin.digits.model import UNET_FILE

            return (found / UNET_FILE).resolve() if (found / UNET_FILE).is_file() else found.resolve()
    return None


def check_transfer(base: str | Path, adapter: str | Path, *, device: str = "auto") -> TransferCheck:
    """Compare ``base`` with the teacher ``adapter`` was trained on (see the module docstring).

    Raises WadiInputError when the base has another architecture than the training teacher (names or shapes).
    """
    from wadi_distill.lorad.serialization import read_adapter
    from wadi_probe.rotation import merged_weight
    from wadi_probe.analyze import compare
    from wadi_probe.io.checkpoints import architecture_differences, open_checkpoint

    base, adapter = Path(base).expanduser(), Path(adapter).expanduser()
    record = _training_teacher_record(adapter)
    recorded = record[0] if record else None
    teacher = _resolve(recorded, adapter) if recorded else None
    check = TransferCheck(base, recorded, teacher is not None, False)
    if recorded is None or teacher is None:
        return check
    if teacher.resolve() == base.resolve():
        check.same_base = True
        return check
    try:
        open_checkpoint(teacher).close()
    except WadiInputError as exc:  # the recorded path exists but is no model: say where it came from, go on
        check.unreadable = (f"the adapter's training teacher {recorded} (from {record[1]}) cannot be read "
                            f"({str(exc).rstrip('.')}), so how far {base} is from it cannot be measured.")
        return check
    with open_checkpoint(teacher) as t, open_checkpoint(base) as b:
        differ = architecture_differences(t, b)
        if differ:
            raise WadiInputError(
                f"{base} is not the architecture of the training teacher {recorded}: {differ[0]} differs "
                f"({len(differ)} tensors in all)."
            )
        if all(torch.equal(t.tensor(n), b.tensor(n)) for n in t.names()):
            check.same_base = True
            return check
        parsed = read_adapter(adapter, base_shapes={n: b.shape(n) for n in b.names()})
        by_weight = {f"{module}.weight": module for module in parsed.factors}
        dot = total = rotated = 0.0
        for name in t.names():
            if len(t.shape(name)) < 2:
                continue
            change = b.tensor(name).double() - t.tensor(name).double()
            energy = float((change * change).sum())
            total += energy
            module = by_weight.get(name)
            if module is None:
                dot += energy
                continue
            a, bb = parsed.factors[module]
            if parsed.kind == "lorad":
                moved = merged_weight(change, a.double(), bb.double(), kind="lorad")
            else:  # a LoRA adds to the weight: the base's own change passes through unchanged
                moved = change
            dot += float((moved * change).sum())
            rotated += energy
    check.report = compare(teacher, base, device=device, spectra=False)
    if total > 0:
        check.kept_cosine, check.adapted_energy_share = dot / total, rotated / total
    return check
