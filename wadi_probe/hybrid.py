"""Norm/direction hybrids of a teacher and a student: the swap ablation of the WaDi paper's Fig. 1(c).

Every weight row (output unit; conv kernels flattened per output channel; a 1-D tensor is one whole vector)
factors as norm × direction. ``take="norm"`` keeps the student's directions and puts the teacher's norms back;
``take="direction"`` keeps the student's norms and puts the teacher's directions back. If the student mostly
changed directions (the paper's finding), the first hybrid still behaves like the student and the second falls
back towards the teacher.

A row whose direction is undefined (zero norm) or that holds NaN/Inf stays the student's, and is counted.
Tensors that do not pair by name and shape, and non-float tensors, stay the student's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from wadi_probe.errors import WadiInputError

if TYPE_CHECKING:
    from wadi_probe.io.checkpoints import Checkpoint

Take = Literal["norm", "direction"]
TAKES = ("norm", "direction")


def _check_take(take: str) -> None:
    if take not in TAKES:
        raise WadiInputError(f"--take must be 'norm' or 'direction', got {take!r}.")


def swap_rows(teacher: torch.Tensor, student: torch.Tensor, take: Take) -> tuple[torch.Tensor, int]:
    """Per-row hybrid of one tensor pair and the number of rows that could not be swapped (left as the student's).

    ``take="norm"``: row i becomes ‖t_i‖ · s_i / ‖s_i‖. ``take="direction"``: row i becomes ‖s_i‖ · t_i / ‖t_i‖.
    The arithmetic runs in float64 on the tensors' device; the result has the student's dtype and shape.
    """
    _check_take(take)
    if teacher.shape != student.shape:
        raise WadiInputError(f"cannot swap rows of tensors with shapes {tuple(teacher.shape)} and {tuple(student.shape)}.")
    if not student.is_floating_point() or not teacher.is_floating_point():
        return student.clone(), 0
    rows = student.shape[0] if student.ndim >= 2 else 1
    t = teacher.reshape(rows, -1).to(torch.float64)
    s = student.reshape(rows, -1).to(torch.float64)
    t_norm = t.norm(dim=1, keepdim=True)
    s_norm = s.norm(dim=1, keepdim=True)
    finite = torch.isfinite(t).all(dim=1, keepdim=True) & torch.isfinite(s).all(dim=1, keepdim=True)
    if take == "norm":
        usable = finite & (s_norm > 0)
        hybrid = s * (t_norm / torch.where(usable, s_norm, 1.0))
    else:
        usable = finite & (t_norm > 0)
        hybrid = t * (s_norm / torch.where(usable, t_norm, 1.0))
    hybrid = torch.where(usable, hybrid, s)
    both_zero = (t_norm == 0) & (s_norm == 0)  # nothing to swap: the row stays zero either way
    kept_rows = int((~usable & ~both_zero).sum().item())
    return hybrid.reshape(student.shape).to(student.dtype), kept_rows


@dataclass
class HybridResult:
    """What a swap produced: the written file (if any), how many tensors were swapped, what stayed the student's."""

    take: str
    swapped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    kept_rows: int = 0
    path: Path | None = None


@contextlib.contextmanager
def _opened(teacher: object, student: object) -> Iterator[tuple[Checkpoint, Checkpoint]]:
    """Yield (teacher, student) as checkpoints, opening paths and closing only what was opened here."""
    from wadi_probe.io.checkpoints import AdapterWithoutBase, Checkpoint, open_checkpoint

    with contextlib.ExitStack() as stack:
        opened = []
        for source, role in ((teacher, "teacher"), (student, "student")):
            if isinstance(source, Checkpoint):
                opened.append(source)
            elif isinstance(source, (str, os.PathLike)):
                from wadi_probe.builtins import resolve_builtin

                try:
                    checkpoint = open_checkpoint(resolve_builtin(source))
                except AdapterWithoutBase as exc:
                    raise WadiInputError(
                        f"the {role} {exc.path} is an adapter (LoRA/LoRaD weights), not a full model; a hybrid takes "
                        "the full weights of both (merge an adapter first with `wadi-distill export`).") from exc
                stack.callback(checkpoint.close)
                opened.append(checkpoint)
            else:
                raise WadiInputError(f"the {role} must be a checkpoint or a path, got {type(source).__name__}.")
        yield opened[0], opened[1]


class _Hybrid:
    """Pairs two open checkpoints and produces hybrid tensors one name at a time."""

    def __init__(self, teacher, student, take: Take, include: str | None, exclude: str | None) -> None:
        from wadi_probe.pairing import pair_checkpoints

        _check_take(take)
        self.teacher, self.student, self.take = teacher, student, take
        pairing = pair_checkpoints(teacher, student, include=include, exclude=exclude)
        self.matched = set(pairing.matched)
        self.result = HybridResult(take=take)
        self.result.swapped = [n for n in student.names() if n in self.matched]
        self.result.kept = [n for n in student.names() if n not in self.matched]

    def tensor(self, name: str) -> torch.Tensor:
        student = self.student.tensor(name)
        if name not in self.matched:
            return student
        hybrid, kept_rows = swap_rows(self.teacher.tensor(name), student, self.take)
        self.result.kept_rows += kept_rows
        return hybrid


def swap_hybrid(
    teacher: object, student: object, take: Take = "norm", *, include: str | None = None, exclude: str | None = None
) -> dict[str, torch.Tensor]:
    """All of the student's tensors, with the teacher's per-row norms (``take="norm"``) or directions
    (``take="direction"``) swapped into every tensor the two share (optionally only names matching ``include``
    and not ``exclude``). ``teacher``/``student`` are checkpoints or paths. Holds the whole result in memory;
    :func:`write_hybrid` streams instead.
    """
    _check_take(take)
    with _opened(teacher, student) as (t, s):
        hybrid = _Hybrid(t, s, take, include, exclude)
        return {name: hybrid.tensor(name) for name in s.names()}


def write_hybrid(
    teacher: object,
    student: object,
    take: Take,
    output: str | Path,
    *,
    include: str | None = None,
    exclude: str | None = None,
) -> HybridResult:
    """Write the hybrid in the student's layout (its key names and dtypes), atomically, one tensor at a time.

    The output must be a new ``.safetensors`` (or ``.bin``/``.pt``/``.ckpt``) file, not one of the inputs; on
    any error nothing is written and an existing file at ``output`` is left as it was.
    """
    from wadi_probe.io.checkpoints import lazy_tensors, stored_bytes, write_like
    from wadi_probe.io.outputs import check_free_space, check_outputs

    _check_take(take)
    output = Path(output).expanduser()
    if output.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
        raise WadiInputError(f"the output {output} should end in .safetensors (or .bin/.pt/.ckpt for a torch file).")
    check_outputs({"hybrid": output}, [teacher, student])
    with _opened(teacher, student) as (t, s):
        for checkpoint, role in ((t, "teacher"), (s, "student")):  # the files behind an index or a sharded model
            inputs = {checkpoint.path} | {checkpoint.source_file(n) for n in checkpoint.names()}
            if output.exists() and any(p.exists() and output.samefile(p) for p in inputs):
                raise WadiInputError(f"the output {output} is the {role} checkpoint itself; write to a new file.")
        check_free_space(output, stored_bytes(s), "hybrid")
        hybrid = _Hybrid(t, s, take, include, exclude)
        write_like(s, lazy_tensors(s, override=hybrid.tensor), output)
        hybrid.result.path = output
        return hybrid.result
